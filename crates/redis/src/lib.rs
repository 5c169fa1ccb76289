//! Redis implementations of Switchyard's backend traits, for standalone Redis and Redis Cluster.
//!
//! - Publishing is one Lua script per room ([`scripts::PUBLISH`]): dedup, next offset, history append
//!   (a stream with entry ids `<offset>-0`, capped and expiring), and delivery on the room channel.
//!   The epoch is created with the room's metadata and changes whenever that metadata is lost.
//! - Each node subscribes once per room (not per connection) and once to the node bus (direct
//!   messages, broadcasts, disconnects). It tracks the last offset it delivered per room: a gap in
//!   the live stream, or a lost subscriber connection, is filled from history, or reported to the
//!   hub as a reset (`recovered: false`) when history cannot fill it.
//! - Sessions use the seed's exact key and JSON (`session:<id>`, TTL 3600 s).
//! - Presence entries carry an expiry that each node refreshes, so a crashed node's members vanish
//!   within the presence TTL, with leave events.
//! - Every call goes through a circuit breaker with a deadline: with Redis down, requests fail fast
//!   with `UNAVAILABLE`; nothing is acknowledged that was not stored.

pub mod breaker;
pub mod conn;
pub mod keys;
pub mod scripts;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use redis::{PushInfo, PushKind, Value};
use serde::Deserialize;
use serde_json::value::RawValue;
use switchyard_core::backend::*;
use switchyard_core::clock::unix_ms;
use switchyard_core::metrics::Metrics;
use switchyard_proto::{Payload, PresenceEntry, RoomName, StreamPosition, UserId};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::breaker::Breaker;
use crate::conn::{Commands, Subscriber};
pub use crate::conn::{Timeouts, Topology};
use crate::keys::Keys;

/// Most publications read to fill one gap; a larger gap is reported as a reset.
const GAP_FILL_MAX: usize = 10_000;

/// Redis-specific settings.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub topology: Topology,
    /// Prefix of every key and channel (sessions included: `<prefix>session:<id>`).
    pub key_prefix: String,
    pub timeouts: Timeouts,
    /// Consecutive failures that open the circuit.
    pub breaker_failures: u32,
    /// How long the circuit stays open before a probe.
    pub breaker_cooldown: Duration,
    /// How long a presence entry lives without a refresh from its node.
    pub presence_ttl: Duration,
    /// Replicas that must confirm a publication before it is acknowledged (0: the master's word).
    pub ack_replicas: u32,
    /// PEM certificates trusted for `rediss://` servers instead of the public web roots (a private
    /// CA, or a self-signed server certificate).
    pub tls_ca_pem: Option<Vec<u8>>,
}

impl RedisSettings {
    pub fn new(topology: Topology) -> Self {
        RedisSettings {
            topology,
            key_prefix: String::new(),
            timeouts: Timeouts {
                connect: Duration::from_secs(2),
                response: Duration::from_millis(500),
            },
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(2),
            presence_ttl: Duration::from_secs(60),
            ack_replicas: 0,
            tls_ca_pem: None,
        }
    }
}

/// Delivery state of one subscribed room on this node.
#[derive(Default)]
struct RoomTrack {
    epoch: Option<Arc<str>>,
    /// Offset of the last publication handed to the hub.
    last: u64,
    /// A gap is being filled from history; live publications wait in `waiting`.
    filling: bool,
    waiting: Vec<Arc<Publication>>,
}

/// All three backend roles on Redis.
pub struct RedisBackend {
    settings: BackendSettings,
    redis: RedisSettings,
    keys: Keys,
    /// Random per process: presence entries of this node are `user\x1f<instance>\x1f<conn>`.
    instance: String,
    publish_command: &'static str,
    commands: Commands,
    subscriber: Subscriber,
    breaker: Breaker,
    sink: OnceLock<Weak<dyn DeliverySink>>,
    rooms: Mutex<HashMap<RoomName, RoomTrack>>,
    local_presence: Mutex<HashMap<RoomName, HashMap<u64, UserId>>>,
    resync: Notify,
    /// Clean-up commands of closing connections allowed at Redis at once (see [`CLEANUP_IN_FLIGHT`]).
    cleanup_permits: tokio::sync::Semaphore,
    weak_self: Weak<RedisBackend>,
}

/// Most clean-up commands (presence remove, session detach) one node has at Redis at once. When
/// tens of thousands of clients go at once (a network cut, a load balancer restart), every close
/// used to send its commands at the same moment: the backlog outgrew the response timeout, the
/// breaker opened, and the rest failed fast, leaving presence entries and session statuses stale
/// (measured: 100,000 connections closing over 6 nodes produced 22,461 timeouts and 128,726
/// fail-fast errors). Closes now wait their turn before the timeout starts, requests of live
/// clients never queue behind more than this many clean-ups, and a clean-up that still times out
/// does not open the breaker.
const CLEANUP_IN_FLIGHT: usize = 32;

/// Hands push messages of the subscriber connection to the backend (set once it exists).
struct PushHandler {
    backend: Arc<OnceLock<Weak<RedisBackend>>>,
}

impl redis::aio::AsyncPushSender for PushHandler {
    fn send(&self, info: PushInfo) -> Result<(), redis::aio::SendError> {
        if let Some(backend) = self.backend.get().and_then(Weak::upgrade) {
            backend.on_push(info);
        }
        Ok(())
    }
}

/// Messages on room channels and the node bus. One permissive shape for all kinds.
#[derive(Deserialize)]
struct Wire<'a> {
    k: Cow<'a, str>,
    /// Publication: offset, epoch, ts, from, id, data.
    o: Option<u64>,
    e: Option<String>,
    t: Option<u64>,
    f: Option<String>,
    i: Option<String>,
    #[serde(borrow)]
    d: Option<&'a RawValue>,
    /// Presence: joins, leaves.
    j: Option<Vec<String>>,
    l: Option<Vec<String>>,
    /// Direct: recipient and seq.
    to: Option<String>,
    s: Option<u64>,
    /// Disconnect target.
    user: Option<String>,
    session: Option<String>,
}

fn corrupt(what: &str) -> BackendError {
    BackendError::Corrupt(what.to_string())
}

fn value_str(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn value_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        other => value_str(other)?.parse().ok(),
    }
}

fn json_opt(value: Option<&str>) -> String {
    serde_json::to_string(&value).unwrap_or_else(|_| "null".into())
}

/// Parses one stream entry `[id, [field, value, ...]]` into its offset and fields.
fn parse_entry(entry: &Value) -> Option<(u64, HashMap<String, String>)> {
    let Value::Array(parts) = entry else { return None };
    let id = value_str(parts.first()?)?;
    let offset = id.split('-').next()?.parse().ok()?;
    let Value::Array(raw) = parts.get(1)? else {
        return None;
    };
    let mut fields = HashMap::new();
    for pair in raw.chunks(2) {
        if let [k, v] = pair {
            fields.insert(value_str(k)?, value_str(v)?);
        }
    }
    Some((offset, fields))
}

fn opt_from_json(text: Option<&String>) -> Option<String> {
    text.and_then(|t| serde_json::from_str::<Option<String>>(t).ok())
        .flatten()
}

/// A room read: position, oldest fresh offset kept, entries.
struct Read {
    position: StreamPosition,
    oldest: u64,
    publications: Vec<Arc<Publication>>,
}

impl RedisBackend {
    /// Connects to Redis and starts the background tasks (resync, presence refresh), which stop
    /// with `stop`.
    pub async fn connect(
        settings: BackendSettings,
        redis: RedisSettings,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, BackendError> {
        let cell = Arc::new(OnceLock::new());
        let (commands, subscriber) = conn::connect(
            &redis.topology,
            redis.timeouts,
            redis.tls_ca_pem.as_deref(),
            PushHandler {
                backend: cell.clone(),
            },
        )
        .await
        .map_err(|e| BackendError::Unavailable(format!("cannot connect to redis: {e}")))?;
        let publish_command = match redis.topology {
            Topology::Standalone(_) => "PUBLISH",
            Topology::Cluster(_) => "SPUBLISH",
        };
        let backend = Arc::new_cyclic(|weak_self| RedisBackend {
            keys: Keys::new(&redis.key_prefix),
            breaker: Breaker::new(
                redis.breaker_failures,
                redis.breaker_cooldown,
                redis.timeouts.response + Duration::from_millis(100),
                metrics,
            ),
            instance: format!("{:016x}", rand::random::<u64>()),
            settings,
            redis,
            publish_command,
            commands,
            subscriber,
            sink: OnceLock::new(),
            rooms: Mutex::new(HashMap::new()),
            local_presence: Mutex::new(HashMap::new()),
            resync: Notify::new(),
            cleanup_permits: tokio::sync::Semaphore::new(CLEANUP_IN_FLIGHT),
            weak_self: weak_self.clone(),
        });
        let _ = cell.set(Arc::downgrade(&backend));
        backend
            .breaker
            .call(
                "subscribe to the node bus",
                backend.subscriber.subscribe(&backend.keys.bus()),
            )
            .await?;
        backend.load_scripts().await;
        tokio::spawn(backend.clone().run_resync(stop.clone()));
        tokio::spawn(backend.clone().run_presence_refresh(stop));
        Ok(backend)
    }

    /// Loads every script, so that the first calls after a (re)start do not each find the script
    /// missing and load it themselves. Best effort: a call still loads a missing script on its own.
    async fn load_scripts(&self) {
        for script in scripts::all() {
            let invocation = script.prepare_invoke();
            let loaded = match &self.commands {
                Commands::Standalone(c) => invocation.load_async(&mut c.clone()).await,
                Commands::Cluster(c) => invocation.load_async(&mut c.clone()).await,
            };
            if let Err(e) = loaded {
                tracing::debug!(error = %e, "script not preloaded");
            }
        }
    }

    /// The three backend roles served by this backend.
    pub fn backends(self: &Arc<Self>) -> Backends {
        Backends {
            broker: self.clone(),
            sessions: self.clone(),
            presence: self.clone(),
        }
    }

    fn sink(&self) -> Option<Arc<dyn DeliverySink>> {
        self.sink.get().and_then(Weak::upgrade)
    }

    // ---- push messages ----

    fn on_push(&self, info: PushInfo) {
        match info.kind {
            PushKind::Message | PushKind::SMessage => {
                let (Some(channel), Some(Value::BulkString(payload))) =
                    (info.data.first().and_then(value_str), info.data.get(1))
                else {
                    return;
                };
                self.on_message(&channel, payload);
            }
            PushKind::Disconnection => {
                tracing::warn!("redis subscriber connection lost; will resynchronise rooms");
                self.resync.notify_one();
            }
            PushKind::SUnsubscribe | PushKind::Unsubscribe => {
                // Redis dropped a subscription we still want (e.g. its slot moved): resubscribe.
                let wanted = info
                    .data
                    .first()
                    .and_then(value_str)
                    .and_then(|c| self.keys.room_of_channel(&c))
                    .is_some_and(|room| self.rooms.lock().contains_key(&room));
                if wanted {
                    self.resync.notify_one();
                }
            }
            _ => {}
        }
    }

    fn on_message(&self, channel: &str, payload: &[u8]) {
        let Ok(wire) = serde_json::from_slice::<Wire<'_>>(payload) else {
            tracing::warn!(channel, "unreadable message on a switchyard channel");
            return;
        };
        let Some(sink) = self.sink() else { return };
        if channel == self.keys.bus() {
            self.on_bus(&*sink, wire);
        } else if let Some(room) = self.keys.room_of_channel(channel) {
            match &*wire.k {
                "p" => {
                    if let Some(publication) = publication_from_wire(&room, &wire) {
                        self.on_publication(&*sink, publication);
                    }
                }
                "pr" => {
                    let users = |list: Option<Vec<String>>| -> Vec<UserId> {
                        list.unwrap_or_default()
                            .iter()
                            .filter_map(|u| UserId::parse(u).ok())
                            .collect()
                    };
                    sink.presence(&PresenceDiff {
                        room,
                        joins: users(wire.j),
                        leaves: users(wire.l),
                    });
                }
                _ => {}
            }
        }
    }

    fn on_bus(&self, sink: &dyn DeliverySink, wire: Wire<'_>) {
        match &*wire.k {
            "sys" => {
                if let Some(data) = wire.d.and_then(|d| Payload::from_json(d.get()).ok()) {
                    sink.system(Arc::new(SystemMessage {
                        data,
                        ts: wire.t.unwrap_or_default(),
                    }));
                }
            }
            "dm" => {
                let (Some(to), Some(seq), Some(data)) = (
                    wire.to.as_deref().and_then(|u| UserId::parse(u).ok()),
                    wire.s,
                    wire.d.and_then(|d| Payload::from_json(d.get()).ok()),
                ) else {
                    return;
                };
                sink.direct(Arc::new(DirectMessage {
                    to,
                    from: wire.f.as_deref().and_then(|u| UserId::parse(u).ok()),
                    data,
                    ts: wire.t.unwrap_or_default(),
                    seq,
                    id: wire.i,
                }));
            }
            "dc" => {
                if let Some(user) = wire.user.as_deref().and_then(|u| UserId::parse(u).ok()) {
                    sink.disconnect(&DisconnectTarget::User(user));
                } else if let Some(session) = wire.session {
                    sink.disconnect(&DisconnectTarget::Session(session));
                }
            }
            _ => {}
        }
    }

    /// Hands a live publication to the hub in offset order, filling gaps from history.
    fn on_publication(&self, sink: &dyn DeliverySink, publication: Arc<Publication>) {
        let mut rooms = self.rooms.lock();
        let Some(track) = rooms.get_mut(&publication.room) else {
            return;
        };
        if track.filling {
            track.waiting.push(publication);
            return;
        }
        match &track.epoch {
            None => {
                track.epoch = Some(publication.epoch.clone());
                track.last = publication.offset;
                sink.publication(publication);
            }
            Some(epoch) if **epoch != *publication.epoch => {
                // Redis lost this room's history (and offsets restarted): say so, then go on.
                let position = StreamPosition {
                    offset: publication.offset.saturating_sub(1),
                    epoch: publication.epoch.to_string(),
                };
                track.epoch = Some(publication.epoch.clone());
                track.last = publication.offset;
                sink.reset(&publication.room, &position);
                sink.publication(publication);
            }
            Some(_) if publication.offset <= track.last => {}
            Some(_) if publication.offset == track.last + 1 => {
                track.last = publication.offset;
                sink.publication(publication);
            }
            Some(_) => {
                track.filling = true;
                let room = publication.room.clone();
                track.waiting.push(publication);
                drop(rooms);
                if let Some(this) = self.weak_self.upgrade() {
                    tokio::spawn(async move { this.fill(&room).await });
                }
            }
        }
    }

    /// Fills the room's gap from history (or resets it) and then releases the waiting publications.
    async fn fill(&self, room: &RoomName) {
        loop {
            let (epoch, last) = {
                let mut rooms = self.rooms.lock();
                let Some(track) = rooms.get_mut(room) else { return };
                track.filling = true;
                (track.epoch.clone(), track.last)
            };
            let read = self.read(room, Some(last), GAP_FILL_MAX).await;
            let Some(sink) = self.sink() else { return };
            let mut rooms = self.rooms.lock();
            let Some(track) = rooms.get_mut(room) else { return };
            let read = match read {
                Ok(read) => read,
                Err(e) => {
                    // Still filling; the resync task retries once Redis answers again.
                    tracing::warn!(error = %e, %room, "cannot fill a gap yet");
                    drop(rooms);
                    self.resync.notify_one();
                    return;
                }
            };
            let same_epoch = epoch.as_deref().is_none_or(|e| e == read.position.epoch);
            let covered = read.position.offset <= last || (read.oldest != 0 && read.oldest <= last + 1);
            let complete = read.position.offset.saturating_sub(last) as usize <= GAP_FILL_MAX;
            if same_epoch && covered && complete {
                for publication in read.publications {
                    if publication.offset == track.last + 1 {
                        track.last = publication.offset;
                        sink.publication(publication);
                    }
                }
            } else {
                tracing::warn!(%room, last, top = read.position.offset, "gap cannot be filled from history; resetting");
                track.last = read.position.offset;
                sink.reset(room, &read.position);
            }
            track.epoch = Some(Arc::from(read.position.epoch.as_str()));
            let mut waiting = std::mem::take(&mut track.waiting);
            waiting.sort_by_key(|p| p.offset);
            let mut gap = false;
            for publication in waiting {
                if publication.offset <= track.last || *publication.epoch != *read.position.epoch {
                    continue;
                }
                if publication.offset == track.last + 1 && !gap {
                    track.last = publication.offset;
                    sink.publication(publication);
                } else {
                    gap = true;
                    track.waiting.push(publication);
                }
            }
            if !gap {
                track.filling = false;
                return;
            }
        }
    }

    /// After the subscriber connection came back: resubscribe, then check every room for
    /// publications missed meanwhile.
    async fn run_resync(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.resync.notified() => {}
            }
            let mut delay = Duration::from_millis(100);
            loop {
                if stop.is_cancelled() {
                    return;
                }
                let ready = async {
                    self.subscriber.ping().await?;
                    self.subscriber.subscribe(&self.keys.bus()).await?;
                    let rooms: Vec<RoomName> = self.rooms.lock().keys().cloned().collect();
                    for room in &rooms {
                        self.subscriber.subscribe(&self.keys.room_channel(room)).await?;
                    }
                    redis::RedisResult::Ok(rooms)
                };
                match tokio::time::timeout(self.redis.timeouts.response * 4, ready).await {
                    Ok(Ok(rooms)) => {
                        tracing::info!(
                            rooms = rooms.len(),
                            "redis subscriber back; checking rooms for gaps"
                        );
                        self.load_scripts().await;
                        for room in rooms {
                            self.fill(&room).await;
                        }
                        self.write_local_presence(false).await;
                        break;
                    }
                    _ => {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                }
            }
        }
    }

    // ---- reads ----

    async fn read(&self, room: &RoomName, after: Option<u64>, limit: usize) -> BackendResult<Read> {
        let mut invocation = scripts::READ.prepare_invoke();
        invocation
            .key(self.keys.room_meta(room))
            .key(self.keys.room_history(room))
            .arg(if after.is_some() { "after" } else { "latest" })
            .arg(after.unwrap_or(0))
            .arg(limit.max(1))
            .arg(self.settings.history_ttl_secs);
        let reply: Vec<Value> = self
            .breaker
            .call("read history", self.commands.invoke(&invocation))
            .await?;
        let top = reply
            .first()
            .and_then(value_u64)
            .ok_or_else(|| corrupt("history read: no top"))?;
        let epoch = reply
            .get(1)
            .and_then(value_str)
            .ok_or_else(|| corrupt("history read: no epoch"))?;
        let oldest = reply.get(2).and_then(value_u64).unwrap_or(0);
        let epoch_arc: Arc<str> = Arc::from(epoch.as_str());
        let mut publications = Vec::with_capacity(reply.len().saturating_sub(3));
        for entry in reply.iter().skip(3) {
            let (offset, fields) = parse_entry(entry).ok_or_else(|| corrupt("history read: bad entry"))?;
            if offset > top || limit == 0 {
                continue;
            }
            let data = fields
                .get("d")
                .and_then(|d| Payload::from_json(d).ok())
                .ok_or_else(|| corrupt("history entry data"))?;
            publications.push(Arc::new(Publication {
                room: room.clone(),
                offset,
                epoch: epoch_arc.clone(),
                from: opt_from_json(fields.get("f")).and_then(|u| UserId::parse(&u).ok()),
                data,
                ts: fields.get("t").and_then(|t| t.parse().ok()).unwrap_or_default(),
                id: opt_from_json(fields.get("i")),
            }));
        }
        Ok(Read {
            position: StreamPosition { offset: top, epoch },
            oldest,
            publications,
        })
    }

    /// Waits until `ack_replicas` replicas of the master holding `key` have the writes made so far
    /// on our connection to it (Redis `WAIT`). Without enough confirmations the publication may be
    /// stored (and delivered) yet could be lost by a failover, so it is not acknowledged: the client
    /// gets `UNAVAILABLE` and retries with the same `id`, which returns the stored offset.
    async fn wait_for_replicas(&self, key: &str) -> BackendResult<()> {
        let wanted = self.redis.ack_replicas;
        let timeout_ms = u64::try_from(self.redis.timeouts.response.as_millis()).unwrap_or(500) / 2;
        let wait = redis::cmd("WAIT").arg(wanted).arg(timeout_ms.max(1)).to_owned();
        let confirmed: i64 = match &self.commands {
            Commands::Standalone(_) => {
                self.breaker
                    .call("wait for replicas", self.commands.query(&wait))
                    .await?
            }
            Commands::Cluster(connection) => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
                    keys::slot(key),
                    SlotAddr::Master,
                )));
                let value = self
                    .breaker
                    .call("wait for replicas", connection.clone().route_command(wait, route))
                    .await?;
                value_u64(&value).and_then(|n| i64::try_from(n).ok()).unwrap_or(0)
            }
        };
        if confirmed < i64::from(wanted) {
            return Err(BackendError::Unavailable(format!(
                "publication stored but confirmed by {confirmed} of {wanted} replicas; retry with the same id"
            )));
        }
        Ok(())
    }

    async fn publish_json(&self, channel: String, message: String) -> BackendResult<()> {
        let cmd = redis::cmd(self.publish_command)
            .arg(channel)
            .arg(message)
            .to_owned();
        self.breaker
            .call("publish", self.commands.query::<i64>(&cmd))
            .await
            .map(|_| ())
    }

    fn presence_member(&self, user: &UserId, conn: u64) -> String {
        format!("{user}\u{1f}{}\u{1f}{conn}", self.instance)
    }

    /// Records presence entries of one room; returns one "newly present" flag per entry, and
    /// publishes leave events for users whose entries expired (their node died).
    async fn presence_add(
        &self,
        room: &RoomName,
        entries: &[(u64, UserId)],
        refresh: bool,
    ) -> BackendResult<Vec<bool>> {
        let ttl_ms = u64::try_from(self.redis.presence_ttl.as_millis()).unwrap_or(60_000);
        let mut invocation = scripts::PRESENCE_ADD.prepare_invoke();
        invocation
            .key(self.keys.presence_conns(room))
            .key(self.keys.presence_users(room))
            .arg(ttl_ms)
            .arg((ttl_ms / 1000).max(1) * 2)
            .arg(if refresh { "refresh" } else { "add" });
        for (conn, user) in entries {
            invocation
                .arg(self.presence_member(user, *conn))
                .arg(user.as_str());
        }
        let reply: Vec<Value> = self
            .breaker
            .call("presence add", self.commands.invoke(&invocation))
            .await?;
        let split = reply
            .iter()
            .position(|v| value_str(v).is_some_and(|s| s.is_empty()))
            .unwrap_or(reply.len());
        let firsts = reply[..split].iter().map(|v| value_u64(v) == Some(1)).collect();
        let left: Vec<UserId> = reply
            .iter()
            .skip(split + 1)
            .filter_map(value_str)
            .filter_map(|u| UserId::parse(&u).ok())
            .collect();
        if !left.is_empty() {
            let diff = PresenceDiff {
                room: room.clone(),
                joins: vec![],
                leaves: left,
            };
            self.presence_event(&diff).await?;
        }
        Ok(firsts)
    }

    /// Refreshes this node's presence entries well within their TTL.
    async fn run_presence_refresh(self: Arc<Self>, stop: CancellationToken) {
        let period = self.redis.presence_ttl / 3;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.write_local_presence(true).await;
        }
    }

    /// Writes this node's presence entries: a refresh extends them; otherwise (after Redis came
    /// back, when they may have expired or been lost) they are recorded again.
    async fn write_local_presence(&self, refresh: bool) {
        let rooms: Vec<(RoomName, Vec<(u64, UserId)>)> = self
            .local_presence
            .lock()
            .iter()
            .map(|(room, conns)| (room.clone(), conns.iter().map(|(c, u)| (*c, u.clone())).collect()))
            .collect();
        for (room, entries) in rooms {
            for chunk in entries.chunks(500) {
                match self.presence_add(&room, chunk, refresh).await {
                    Ok(firsts) if !refresh => {
                        let joins: Vec<UserId> = chunk
                            .iter()
                            .zip(firsts)
                            .filter(|(_, first)| *first)
                            .map(|((_, u), _)| u.clone())
                            .collect();
                        if !joins.is_empty() {
                            let diff = PresenceDiff {
                                room: room.clone(),
                                joins,
                                leaves: vec![],
                            };
                            let _ = self.presence_event(&diff).await;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, %room, "presence refresh failed"),
                }
            }
        }
    }
}

fn publication_from_wire(room: &RoomName, wire: &Wire<'_>) -> Option<Arc<Publication>> {
    Some(Arc::new(Publication {
        room: room.clone(),
        offset: wire.o?,
        epoch: Arc::from(wire.e.as_deref()?),
        from: wire.f.as_deref().and_then(|u| UserId::parse(u).ok()),
        data: Payload::from_json(wire.d?.get()).ok()?,
        ts: wire.t.unwrap_or_default(),
        id: wire.i.clone(),
    }))
}

#[async_trait]
impl Broker for RedisBackend {
    fn attach(&self, sink: Weak<dyn DeliverySink>) {
        let _ = self.sink.set(sink);
    }

    async fn subscribe(&self, room: &RoomName) -> BackendResult<()> {
        self.rooms.lock().entry(room.clone()).or_default();
        let channel = self.keys.room_channel(room);
        if let Err(e) = self
            .breaker
            .call("subscribe", self.subscriber.subscribe(&channel))
            .await
        {
            self.rooms.lock().remove(room);
            return Err(e);
        }
        // Start gap detection from the current position, unless a live publication came first.
        let position = self.read(room, None, 0).await?.position;
        if let Some(track) = self.rooms.lock().get_mut(room)
            && track.epoch.is_none()
        {
            track.epoch = Some(Arc::from(position.epoch.as_str()));
            track.last = position.offset;
        }
        Ok(())
    }

    async fn unsubscribe(&self, room: &RoomName) -> BackendResult<()> {
        self.rooms.lock().remove(room);
        self.breaker
            .call(
                "unsubscribe",
                self.subscriber.unsubscribe(&self.keys.room_channel(room)),
            )
            .await
    }

    async fn publish(&self, room: &RoomName, new: NewPublication) -> BackendResult<PublishOutcome> {
        let meta = self.keys.room_meta(room);
        let dedup = match &new.id {
            Some(id) => self.keys.room_dedup(room, id),
            None => meta.clone(),
        };
        let mut invocation = scripts::PUBLISH.prepare_invoke();
        invocation
            .key(meta)
            .key(self.keys.room_history(room))
            .key(dedup)
            .arg(json_opt(new.from.as_ref().map(UserId::as_str)))
            .arg(new.data.get())
            .arg(json_opt(new.id.as_deref()))
            .arg(new.id.as_deref().unwrap_or(""))
            .arg(self.settings.history_size)
            .arg(self.settings.history_ttl_secs)
            .arg(self.settings.dedup_window_secs)
            .arg(self.keys.room_channel(room))
            .arg(self.publish_command)
            .arg(match self.redis.topology {
                Topology::Standalone(_) => "standalone",
                Topology::Cluster(_) => "cluster",
            });
        let (offset, epoch, duplicate): (u64, String, u8) = self
            .breaker
            .call("publish", self.commands.invoke(&invocation))
            .await?;
        if self.redis.ack_replicas > 0 {
            self.wait_for_replicas(&self.keys.room_meta(room)).await?;
        }
        Ok(PublishOutcome {
            offset,
            epoch,
            duplicate: duplicate == 1,
        })
    }

    async fn position(&self, room: &RoomName) -> BackendResult<StreamPosition> {
        Ok(self.read(room, None, 0).await?.position)
    }

    async fn history(&self, room: &RoomName, after: Option<u64>, limit: usize) -> BackendResult<HistoryPage> {
        let read = self.read(room, after, limit).await?;
        Ok(HistoryPage {
            position: read.position,
            publications: read.publications,
        })
    }

    async fn recover(&self, room: &RoomName, since: &StreamPosition) -> BackendResult<Recovery> {
        let head = self.read(room, None, 0).await?;
        let top = head.position.offset;
        if head.position.epoch != since.epoch || since.offset > top {
            return Ok(Recovery::NotRecovered {
                position: head.position,
            });
        }
        let missed = usize::try_from(top - since.offset).unwrap_or(usize::MAX);
        if missed == 0 {
            return Ok(Recovery::Recovered {
                position: head.position,
                publications: vec![],
            });
        }
        if missed > self.settings.history_size {
            return Ok(Recovery::NotRecovered {
                position: head.position,
            });
        }
        let read = self.read(room, Some(since.offset), missed).await?;
        let contiguous = read.position.epoch == since.epoch
            && read.oldest != 0
            && read.oldest <= since.offset + 1
            && read
                .publications
                .iter()
                .zip(since.offset + 1..)
                .all(|(p, expected)| p.offset == expected)
            && read.publications.len() as u64 == read.position.offset.min(top) - since.offset;
        if contiguous {
            let position = StreamPosition {
                offset: since.offset + read.publications.len() as u64,
                epoch: since.epoch.clone(),
            };
            Ok(Recovery::Recovered {
                position,
                publications: read.publications,
            })
        } else {
            Ok(Recovery::NotRecovered {
                position: read.position,
            })
        }
    }

    async fn presence_event(&self, diff: &PresenceDiff) -> BackendResult<()> {
        let message = serde_json::json!({
            "k": "pr",
            "j": diff.joins.iter().map(UserId::as_str).collect::<Vec<_>>(),
            "l": diff.leaves.iter().map(UserId::as_str).collect::<Vec<_>>(),
        });
        self.publish_json(self.keys.room_channel(&diff.room), message.to_string())
            .await
    }

    async fn broadcast(&self, message: SystemMessage) -> BackendResult<()> {
        let text = format!(r#"{{"k":"sys","t":{},"d":{}}}"#, message.ts, message.data.get());
        self.publish_json(self.keys.bus(), text).await
    }

    async fn send_direct(&self, to: &UserId, new: NewDirect) -> BackendResult<DirectOutcome> {
        let inbox = self.keys.inbox(to);
        let dedup = match &new.id {
            Some(id) => self.keys.inbox_dedup(to, id),
            None => inbox.clone(),
        };
        let from_json = json_opt(new.from.as_ref().map(UserId::as_str));
        let id_json = json_opt(new.id.as_deref());
        let mut invocation = scripts::SEND_DIRECT.prepare_invoke();
        invocation
            .key(inbox)
            .key(self.keys.inbox_seq(to))
            .key(dedup)
            .arg(new.id.as_deref().unwrap_or(""))
            .arg(self.settings.inbox_max)
            .arg(self.settings.inbox_ttl_secs)
            .arg(self.settings.dedup_window_secs)
            .arg(&from_json)
            .arg(new.data.get())
            .arg(&id_json);
        let (seq, duplicate, ts): (i64, u8, u64) = self
            .breaker
            .call("send direct", self.commands.invoke(&invocation))
            .await?;
        if seq < 0 {
            return Err(BackendError::InboxFull {
                user: to.to_string(),
                limit: self.settings.inbox_max,
            });
        }
        let seq = seq as u64;
        if duplicate == 0 {
            let message = format!(
                r#"{{"k":"dm","to":{},"s":{seq},"t":{ts},"f":{from_json},"i":{id_json},"d":{}}}"#,
                json_opt(Some(to.as_str())),
                new.data.get()
            );
            // Stored already: if live delivery fails, the message arrives from the inbox on connect.
            if let Err(e) = self.publish_json(self.keys.bus(), message).await {
                tracing::warn!(error = %e, "direct message stored but not delivered live");
            }
        }
        Ok(DirectOutcome {
            seq,
            duplicate: duplicate == 1,
        })
    }

    async fn inbox(&self, user: &UserId) -> BackendResult<Vec<Arc<DirectMessage>>> {
        let cmd = redis::cmd("XRANGE")
            .arg(self.keys.inbox(user))
            .arg("-")
            .arg("+")
            .to_owned();
        let entries: Vec<Value> = self.breaker.call("read inbox", self.commands.query(&cmd)).await?;
        let min_ts = unix_ms().saturating_sub(self.settings.inbox_ttl_secs * 1000);
        let mut messages = Vec::with_capacity(entries.len());
        for entry in &entries {
            let (seq, fields) = parse_entry(entry).ok_or_else(|| corrupt("inbox entry"))?;
            let ts: u64 = fields.get("t").and_then(|t| t.parse().ok()).unwrap_or_default();
            if ts < min_ts {
                continue;
            }
            let data = fields
                .get("d")
                .and_then(|d| Payload::from_json(d).ok())
                .ok_or_else(|| corrupt("inbox data"))?;
            messages.push(Arc::new(DirectMessage {
                to: user.clone(),
                from: opt_from_json(fields.get("f")).and_then(|u| UserId::parse(&u).ok()),
                data,
                ts,
                seq,
                id: opt_from_json(fields.get("i")),
            }));
        }
        Ok(messages)
    }

    async fn inbox_ack(&self, user: &UserId, upto: u64) -> BackendResult<()> {
        let cmd = redis::cmd("XTRIM")
            .arg(self.keys.inbox(user))
            .arg("MINID")
            .arg(format!("{}-0", upto.saturating_add(1)))
            .to_owned();
        self.breaker
            .call("ack inbox", self.commands.query::<i64>(&cmd))
            .await
            .map(|_| ())
    }

    async fn disconnect(&self, target: &DisconnectTarget) -> BackendResult<()> {
        let message = match target {
            DisconnectTarget::User(user) => serde_json::json!({ "k": "dc", "user": user.as_str() }),
            DisconnectTarget::Session(session) => serde_json::json!({ "k": "dc", "session": session }),
        };
        self.publish_json(self.keys.bus(), message.to_string()).await
    }

    async fn check(&self) -> BackendResult<()> {
        if self.breaker.is_open() {
            return Err(BackendError::Unavailable("redis circuit open".into()));
        }
        let cmd = redis::cmd("PING");
        self.breaker
            .call("ping", self.commands.query::<String>(&cmd))
            .await
            .map(|_| ())
    }
}

#[async_trait]
impl SessionStore for RedisBackend {
    async fn create(&self, id: &str, record: &SessionRecord) -> BackendResult<Session> {
        let json = serde_json::to_string(record).map_err(|e| corrupt(&e.to_string()))?;
        let ttl = self.settings.session_ttl_secs;
        let cmd = redis::cmd("SET")
            .arg(self.keys.session(id))
            .arg(json)
            .arg("EX")
            .arg(ttl)
            .to_owned();
        self.breaker
            .call("create session", self.commands.query::<String>(&cmd))
            .await?;
        Ok(Session {
            id: id.to_string(),
            record: record.clone(),
            expires_in: ttl,
        })
    }

    async fn get(&self, id: &str) -> BackendResult<Option<Session>> {
        let key = self.keys.session(id);
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&key).cmd("TTL").arg(&key);
        let (raw, ttl): (Option<String>, i64) = self
            .breaker
            .call("read session", self.commands.pipeline(&pipe))
            .await?;
        let Some(raw) = raw else { return Ok(None) };
        let record: SessionRecord =
            serde_json::from_str(&raw).map_err(|e| corrupt(&format!("session {id}: {e}")))?;
        Ok(Some(Session {
            id: id.to_string(),
            record,
            expires_in: u64::try_from(ttl).unwrap_or(0),
        }))
    }

    async fn validate(&self, id: &str) -> BackendResult<Option<Session>> {
        let ttl = self.settings.session_ttl_secs;
        let mut invocation = scripts::SESSION_VALIDATE.prepare_invoke();
        invocation.key(self.keys.session(id)).arg(ttl);
        let raw: Option<String> = self
            .breaker
            .call("validate session", self.commands.invoke(&invocation))
            .await?;
        let Some(raw) = raw else { return Ok(None) };
        let Ok(record) = serde_json::from_str::<SessionRecord>(&raw) else {
            return Ok(None);
        };
        if record.status != STATUS_ACTIVE {
            return Ok(None);
        }
        Ok(Some(Session {
            id: id.to_string(),
            record,
            expires_in: ttl,
        }))
    }

    async fn set_status(&self, id: &str, status: &str) -> BackendResult<bool> {
        let mut invocation = scripts::SESSION_SET_STATUS.prepare_invoke();
        invocation.key(self.keys.session(id)).arg(json_opt(Some(status)));
        let changed: i64 = self
            .breaker
            .call("update session", self.commands.invoke(&invocation))
            .await?;
        Ok(changed == 1)
    }

    async fn delete(&self, id: &str) -> BackendResult<bool> {
        let cmd = redis::cmd("DEL").arg(self.keys.session(id)).to_owned();
        let removed: i64 = self
            .breaker
            .call("delete session", self.commands.query(&cmd))
            .await?;
        Ok(removed == 1)
    }

    async fn connection_opened(&self, id: &str) -> BackendResult<()> {
        self.session_attach(id).await
    }

    async fn connection_closed(&self, id: &str) -> BackendResult<bool> {
        self.session_detach(id).await
    }
}

// (SessionStore continues: connection counting.)
impl RedisBackend {
    /// Runs a clean-up command of a closing connection once one of the [`CLEANUP_IN_FLIGHT`]
    /// permits is free; the response timeout starts only then, and its outcome does not move the
    /// breaker ([`Breaker::call_background`]).
    async fn cleanup<T>(
        &self,
        what: &str,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> BackendResult<T> {
        let _permit =
            self.cleanup_permits.acquire().await.map_err(|_| {
                BackendError::Unavailable(format!("redis {what}: the backend is shutting down"))
            })?;
        self.breaker.call_background(what, call).await
    }

    async fn session_attach(&self, id: &str) -> BackendResult<()> {
        let key = self.keys.session_connections(id);
        let mut pipe = redis::pipe();
        pipe.cmd("INCR")
            .arg(&key)
            .ignore()
            .cmd("EXPIRE")
            .arg(&key)
            .arg(self.settings.session_ttl_secs)
            .ignore();
        self.breaker
            .call("count session connection", self.commands.pipeline::<()>(&pipe))
            .await
    }

    async fn session_detach(&self, id: &str) -> BackendResult<bool> {
        let mut invocation = scripts::SESSION_DETACH.prepare_invoke();
        invocation
            .key(self.keys.session_connections(id))
            .key(self.keys.session(id));
        let last: i64 = self
            .cleanup("uncount session connection", self.commands.invoke(&invocation))
            .await?;
        Ok(last == 1)
    }
}

#[async_trait]
impl PresenceStore for RedisBackend {
    async fn add(&self, room: &RoomName, user: &UserId, conn: u64) -> BackendResult<bool> {
        let firsts = self.presence_add(room, &[(conn, user.clone())], false).await?;
        self.local_presence
            .lock()
            .entry(room.clone())
            .or_default()
            .insert(conn, user.clone());
        Ok(firsts.first().copied().unwrap_or(false))
    }

    async fn remove(&self, room: &RoomName, user: &UserId, conn: u64) -> BackendResult<bool> {
        {
            let mut local = self.local_presence.lock();
            if let Some(conns) = local.get_mut(room) {
                conns.remove(&conn);
                if conns.is_empty() {
                    local.remove(room);
                }
            }
        }
        let mut invocation = scripts::PRESENCE_REMOVE.prepare_invoke();
        invocation
            .key(self.keys.presence_conns(room))
            .key(self.keys.presence_users(room))
            .arg(self.presence_member(user, conn))
            .arg(user.as_str());
        let last: i64 = self
            .cleanup("presence remove", self.commands.invoke(&invocation))
            .await?;
        Ok(last == 1)
    }

    async fn list(&self, room: &RoomName) -> BackendResult<Vec<PresenceEntry>> {
        let mut invocation = scripts::PRESENCE_LIST.prepare_invoke();
        invocation
            .key(self.keys.presence_conns(room))
            .key(self.keys.presence_users(room));
        let reply: Vec<Value> = self
            .breaker
            .call("presence list", self.commands.invoke(&invocation))
            .await?;
        let mut entries: Vec<PresenceEntry> = reply
            .chunks(2)
            .filter_map(|pair| match pair {
                [user, count] => Some(PresenceEntry {
                    user_id: UserId::parse(&value_str(user)?).ok()?,
                    connections: u32::try_from(value_u64(count)?).ok()?,
                }),
                _ => None,
            })
            .collect();
        entries.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        Ok(entries)
    }
}
