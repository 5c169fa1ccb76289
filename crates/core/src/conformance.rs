//! The backend conformance suite: one set of checks every backend implementation must pass (the
//! memory backend in this crate's tests, the Redis backend against real Redis). Each check builds
//! fresh backends through the caller's factory with the settings it needs, and uses unique room and
//! user names, so checks may share one Redis.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use switchyard_proto::{Payload, RoomName, StreamPosition, UserId};
use tokio::sync::Notify;

use crate::backend::*;

/// Records everything a broker delivers to this node.
#[derive(Default)]
pub struct Recorder {
    pub publications: Mutex<Vec<Arc<Publication>>>,
    pub presence: Mutex<Vec<PresenceDiff>>,
    pub directs: Mutex<Vec<Arc<DirectMessage>>>,
    pub systems: Mutex<Vec<Arc<SystemMessage>>>,
    pub disconnects: Mutex<Vec<DisconnectTarget>>,
    pub resets: Mutex<Vec<(RoomName, StreamPosition)>>,
    changed: Notify,
}

impl Recorder {
    /// Attaches a new recorder to `broker`.
    pub fn attach(broker: &Arc<dyn Broker>) -> Arc<Recorder> {
        let recorder = Arc::new(Recorder::default());
        let sink: Arc<dyn DeliverySink> = recorder.clone();
        broker.attach(Arc::downgrade(&sink));
        recorder
    }

    /// Waits (at most 10 s) until `done` holds.
    pub async fn wait_until(&self, what: &str, done: impl Fn(&Recorder) -> bool) {
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let changed = self.changed.notified();
                if done(self) {
                    return;
                }
                changed.await;
            }
        })
        .await;
        assert!(waited.is_ok(), "timed out waiting for {what}");
    }

    pub fn offsets(&self, room: &RoomName) -> Vec<u64> {
        self.publications
            .lock()
            .iter()
            .filter(|p| &p.room == room)
            .map(|p| p.offset)
            .collect()
    }
}

impl DeliverySink for Recorder {
    fn publication(&self, publication: Arc<Publication>) {
        self.publications.lock().push(publication);
        self.changed.notify_waiters();
    }
    fn presence(&self, diff: &PresenceDiff) {
        self.presence.lock().push(diff.clone());
        self.changed.notify_waiters();
    }
    fn direct(&self, message: Arc<DirectMessage>) {
        self.directs.lock().push(message);
        self.changed.notify_waiters();
    }
    fn system(&self, message: Arc<SystemMessage>) {
        self.systems.lock().push(message);
        self.changed.notify_waiters();
    }
    fn disconnect(&self, target: &DisconnectTarget) {
        self.disconnects.lock().push(target.clone());
        self.changed.notify_waiters();
    }
    fn reset(&self, room: &RoomName, position: &StreamPosition) {
        self.resets.lock().push((room.clone(), position.clone()));
        self.changed.notify_waiters();
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

fn room(prefix: &str) -> RoomName {
    RoomName::parse(&unique(prefix)).unwrap()
}

fn user(prefix: &str) -> UserId {
    UserId::parse(&unique(prefix)).unwrap()
}

fn data(n: u64) -> Payload {
    Payload::from_value(&serde_json::json!({ "n": n })).unwrap()
}

fn new_pub(n: u64, id: Option<&str>) -> NewPublication {
    NewPublication {
        from: Some(UserId::parse("alice").unwrap()),
        data: data(n),
        id: id.map(str::to_string),
    }
}

fn record(user_id: serde_json::Value) -> SessionRecord {
    SessionRecord {
        user_id,
        created_at: "2026-11-27T07:00:00.000000".into(),
        preferences: serde_json::json!({"theme": "dark"}),
        status: STATUS_ACTIVE.into(),
        extra: serde_json::Map::new(),
    }
}

/// Runs every check. `make` builds fresh backends with the given settings.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn(BackendSettings) -> Fut,
    Fut: Future<Output = Backends>,
{
    publish_orders_offsets_and_delivers_only_when_subscribed(make(BackendSettings::default()).await).await;
    idempotent_publish(make(BackendSettings::default()).await).await;
    history_pages(
        make(BackendSettings {
            history_size: 5,
            ..BackendSettings::default()
        })
        .await,
    )
    .await;
    recovery_is_all_or_nothing(
        make(BackendSettings {
            history_size: 5,
            ..BackendSettings::default()
        })
        .await,
    )
    .await;
    history_expires(
        make(BackendSettings {
            history_ttl_secs: 1,
            ..BackendSettings::default()
        })
        .await,
    )
    .await;
    direct_messages_and_inbox(
        make(BackendSettings {
            inbox_max: 3,
            ..BackendSettings::default()
        })
        .await,
    )
    .await;
    broadcast_presence_events_and_disconnect(make(BackendSettings::default()).await).await;
    sessions_in_seed_format(make(BackendSettings::default()).await).await;
    sessions_expire(
        make(BackendSettings {
            session_ttl_secs: 1,
            ..BackendSettings::default()
        })
        .await,
    )
    .await;
    presence_counts_connections(make(BackendSettings::default()).await).await;
}

pub async fn publish_orders_offsets_and_delivers_only_when_subscribed(b: Backends) {
    let rec = Recorder::attach(&b.broker);
    let r = room("order");
    let start = b.broker.position(&r).await.unwrap();
    assert_eq!(start.offset, 0, "a new room starts at offset 0");
    let first = b.broker.publish(&r, new_pub(0, None)).await.unwrap();
    assert_eq!(first.offset, 1);
    assert_eq!(first.epoch, start.epoch);
    assert!(!first.duplicate);

    b.broker.subscribe(&r).await.unwrap();
    for n in 1..=20 {
        let out = b.broker.publish(&r, new_pub(n, None)).await.unwrap();
        assert_eq!(out.offset, n + 1, "offsets are consecutive");
    }
    rec.wait_until("20 publications", |rec| rec.offsets(&r).len() >= 20)
        .await;
    assert_eq!(
        rec.offsets(&r),
        (2..=21).collect::<Vec<_>>(),
        "delivered in offset order, only once subscribed"
    );
    let delivered = rec.publications.lock().last().cloned().unwrap();
    assert_eq!(delivered.data, data(20));
    assert_eq!(delivered.from.as_ref().map(UserId::as_str), Some("alice"));
    assert!(delivered.ts > 0);

    b.broker.unsubscribe(&r).await.unwrap();
    b.broker.publish(&r, new_pub(99, None)).await.unwrap();
    // A publication to another, subscribed room proves the broker has caught up with the first.
    let marker = room("marker");
    b.broker.subscribe(&marker).await.unwrap();
    b.broker.publish(&marker, new_pub(0, None)).await.unwrap();
    rec.wait_until("marker", |rec| !rec.offsets(&marker).is_empty())
        .await;
    assert_eq!(
        rec.offsets(&r).len(),
        20,
        "nothing is delivered after unsubscribe"
    );
    assert_eq!(b.broker.position(&r).await.unwrap().offset, 22);
}

pub async fn idempotent_publish(b: Backends) {
    let rec = Recorder::attach(&b.broker);
    let r = room("idem");
    b.broker.subscribe(&r).await.unwrap();
    let first = b.broker.publish(&r, new_pub(1, Some("k1"))).await.unwrap();
    let again = b.broker.publish(&r, new_pub(1, Some("k1"))).await.unwrap();
    assert_eq!(
        again.offset, first.offset,
        "a repeated id returns the first offset"
    );
    assert!(again.duplicate && !first.duplicate);
    let other = b.broker.publish(&r, new_pub(2, Some("k2"))).await.unwrap();
    assert_eq!(other.offset, first.offset + 1);
    rec.wait_until("two publications", |rec| rec.offsets(&r).len() >= 2)
        .await;
    assert_eq!(rec.offsets(&r), vec![1, 2], "a duplicate is not delivered twice");
    assert_eq!(
        b.broker
            .history(&r, Some(0), 10)
            .await
            .unwrap()
            .publications
            .len(),
        2
    );
}

pub async fn history_pages(b: Backends) {
    let r = room("hist");
    for n in 1..=8 {
        b.broker
            .publish(&r, new_pub(n, Some(&format!("id{n}"))))
            .await
            .unwrap();
    }
    let page = b.broker.history(&r, None, 3).await.unwrap();
    assert_eq!(page.position.offset, 8);
    assert_eq!(
        page.publications.iter().map(|p| p.offset).collect::<Vec<_>>(),
        vec![6, 7, 8],
        "latest 3"
    );
    let page = b.broker.history(&r, Some(4), 2).await.unwrap();
    assert_eq!(
        page.publications.iter().map(|p| p.offset).collect::<Vec<_>>(),
        vec![5, 6]
    );
    assert_eq!(page.publications[0].id.as_deref(), Some("id5"));
    assert_eq!(page.publications[0].data, data(5));
    let page = b.broker.history(&r, Some(0), 100).await.unwrap();
    assert_eq!(
        page.publications.iter().map(|p| p.offset).collect::<Vec<_>>(),
        vec![4, 5, 6, 7, 8],
        "history keeps the last history_size publications"
    );
    let page = b.broker.history(&r, Some(8), 10).await.unwrap();
    assert!(page.publications.is_empty());
}

pub async fn recovery_is_all_or_nothing(b: Backends) {
    let r = room("recover");
    for n in 1..=8 {
        b.broker.publish(&r, new_pub(n, None)).await.unwrap();
    }
    let top = b.broker.position(&r).await.unwrap();
    let at = |offset| StreamPosition {
        offset,
        epoch: top.epoch.clone(),
    };
    match b.broker.recover(&r, &at(5)).await.unwrap() {
        Recovery::Recovered {
            position,
            publications,
        } => {
            assert_eq!(position, top);
            assert_eq!(
                publications.iter().map(|p| p.offset).collect::<Vec<_>>(),
                vec![6, 7, 8]
            );
        }
        other => panic!("expected recovery, got {other:?}"),
    }
    match b.broker.recover(&r, &at(3)).await.unwrap() {
        Recovery::Recovered { publications, .. } => {
            assert_eq!(
                publications.iter().map(|p| p.offset).collect::<Vec<_>>(),
                vec![4, 5, 6, 7, 8]
            );
        }
        other => panic!("the oldest kept publication follows offset 3: {other:?}"),
    }
    assert_eq!(
        b.broker.recover(&r, &at(2)).await.unwrap(),
        Recovery::NotRecovered {
            position: top.clone()
        },
        "offset 3 is gone: no partial replay"
    );
    assert!(matches!(
        b.broker.recover(&r, &at(8)).await.unwrap(),
        Recovery::Recovered { publications, .. } if publications.is_empty()
    ));
    let wrong_epoch = StreamPosition {
        offset: 7,
        epoch: format!("{}x", top.epoch),
    };
    assert_eq!(
        b.broker.recover(&r, &wrong_epoch).await.unwrap(),
        Recovery::NotRecovered {
            position: top.clone()
        }
    );
    assert_eq!(
        b.broker.recover(&r, &at(9)).await.unwrap(),
        Recovery::NotRecovered { position: top }
    );
}

pub async fn history_expires(b: Backends) {
    let r = room("ttl");
    b.broker.publish(&r, new_pub(1, None)).await.unwrap();
    let top = b.broker.position(&r).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let page = b.broker.history(&r, Some(0), 10).await.unwrap();
        if page.publications.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "history older than its TTL must go"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let since = StreamPosition {
        offset: 0,
        epoch: top.epoch.clone(),
    };
    assert!(
        matches!(
            b.broker.recover(&r, &since).await.unwrap(),
            Recovery::NotRecovered { .. }
        ),
        "expired history cannot recover"
    );
}

pub async fn direct_messages_and_inbox(b: Backends) {
    let rec = Recorder::attach(&b.broker);
    let bob = user("bob");
    let send = |n: u64, id: Option<&str>| NewDirect {
        from: Some(UserId::parse("alice").unwrap()),
        data: data(n),
        id: id.map(str::to_string),
    };
    let first = b.broker.send_direct(&bob, send(1, Some("d1"))).await.unwrap();
    assert_eq!(
        first,
        DirectOutcome {
            seq: 1,
            duplicate: false
        }
    );
    let dup = b.broker.send_direct(&bob, send(1, Some("d1"))).await.unwrap();
    assert_eq!(
        dup,
        DirectOutcome {
            seq: 1,
            duplicate: true
        }
    );
    assert_eq!(b.broker.send_direct(&bob, send(2, None)).await.unwrap().seq, 2);
    rec.wait_until("two directs", |rec| rec.directs.lock().len() >= 2)
        .await;
    let seqs: Vec<u64> = rec.directs.lock().iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![1, 2], "every node gets each direct message once");
    assert_eq!(rec.directs.lock()[0].to, bob);

    let inbox = b.broker.inbox(&bob).await.unwrap();
    assert_eq!(inbox.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(inbox[1].data, data(2));
    b.broker.send_direct(&bob, send(3, None)).await.unwrap();
    let full = b.broker.send_direct(&bob, send(4, None)).await;
    assert!(
        matches!(full, Err(BackendError::InboxFull { limit: 3, .. })),
        "{full:?}"
    );
    b.broker.inbox_ack(&bob, 2).await.unwrap();
    assert_eq!(
        b.broker
            .inbox(&bob)
            .await
            .unwrap()
            .iter()
            .map(|m| m.seq)
            .collect::<Vec<_>>(),
        vec![3]
    );
    assert_eq!(
        b.broker.send_direct(&bob, send(4, None)).await.unwrap().seq,
        4,
        "seq keeps counting after acks"
    );
    b.broker.inbox_ack(&bob, 10).await.unwrap();
    assert!(b.broker.inbox(&bob).await.unwrap().is_empty());
    assert!(b.broker.inbox(&user("nobody")).await.unwrap().is_empty());
}

pub async fn broadcast_presence_events_and_disconnect(b: Backends) {
    let rec = Recorder::attach(&b.broker);
    let r = room("events");
    b.broker.subscribe(&r).await.unwrap();
    b.broker
        .broadcast(SystemMessage { data: data(7), ts: 1 })
        .await
        .unwrap();
    rec.wait_until("system", |rec| !rec.systems.lock().is_empty())
        .await;
    assert_eq!(rec.systems.lock()[0].data, data(7));

    let diff = PresenceDiff {
        room: r.clone(),
        joins: vec![UserId::parse("carol").unwrap()],
        leaves: vec![],
    };
    b.broker.presence_event(&diff).await.unwrap();
    rec.wait_until("presence", |rec| !rec.presence.lock().is_empty())
        .await;
    assert_eq!(rec.presence.lock()[0], diff);

    let target = DisconnectTarget::User(UserId::parse("mallory").unwrap());
    b.broker.disconnect(&target).await.unwrap();
    let session = DisconnectTarget::Session("3f1c".into());
    b.broker.disconnect(&session).await.unwrap();
    rec.wait_until("disconnects", |rec| rec.disconnects.lock().len() >= 2)
        .await;
    assert_eq!(*rec.disconnects.lock(), vec![target, session]);
    b.broker.check().await.unwrap();
}

pub async fn sessions_in_seed_format(b: Backends) {
    let id = unique("sess");
    let created = b
        .sessions
        .create(&id, &record(serde_json::json!("alice")))
        .await
        .unwrap();
    assert_eq!(created.record.status, STATUS_ACTIVE);
    let got = b.sessions.get(&id).await.unwrap().expect("created session");
    assert_eq!(got.record, record(serde_json::json!("alice")));
    assert!(
        got.expires_in > 3500 && got.expires_in <= 3600,
        "TTL 3600 s: {}",
        got.expires_in
    );
    assert_eq!(got.record.user().unwrap().as_str(), "alice");

    assert!(b.sessions.set_status(&id, STATUS_DISCONNECTED).await.unwrap());
    assert_eq!(
        b.sessions.get(&id).await.unwrap().unwrap().record.status,
        STATUS_DISCONNECTED
    );
    let resumed = b
        .sessions
        .validate(&id)
        .await
        .unwrap()
        .expect("a disconnected session can resume");
    assert_eq!(resumed.record.status, STATUS_ACTIVE);
    assert_eq!(
        b.sessions.get(&id).await.unwrap().unwrap().record.status,
        STATUS_ACTIVE
    );

    assert!(b.sessions.set_status(&id, "terminated").await.unwrap());
    assert!(
        b.sessions.validate(&id).await.unwrap().is_none(),
        "a terminated session cannot be used"
    );
    assert!(b.sessions.delete(&id).await.unwrap());
    assert!(!b.sessions.delete(&id).await.unwrap());
    assert!(b.sessions.get(&id).await.unwrap().is_none());
    assert!(b.sessions.validate(&id).await.unwrap().is_none());
    assert!(!b.sessions.set_status(&id, STATUS_ACTIVE).await.unwrap());

    // Connections are counted across nodes: only the last one's end marks the session disconnected.
    let counted = unique("sess");
    b.sessions
        .create(&counted, &record(serde_json::json!("carl")))
        .await
        .unwrap();
    b.sessions.connection_opened(&counted).await.unwrap();
    b.sessions.connection_opened(&counted).await.unwrap();
    assert!(!b.sessions.connection_closed(&counted).await.unwrap());
    assert_eq!(
        b.sessions.get(&counted).await.unwrap().unwrap().record.status,
        STATUS_ACTIVE
    );
    assert!(b.sessions.connection_closed(&counted).await.unwrap());
    assert_eq!(
        b.sessions.get(&counted).await.unwrap().unwrap().record.status,
        STATUS_DISCONNECTED
    );
    b.sessions.connection_opened(&counted).await.unwrap();
    assert!(b.sessions.validate(&counted).await.unwrap().is_some());
    assert!(
        b.sessions.connection_closed(&counted).await.unwrap(),
        "the count starts again after the last detach"
    );

    let numeric = unique("sess");
    let mut extra = record(serde_json::json!(42));
    extra.extra.insert("rooms".into(), serde_json::json!(["lobby"]));
    b.sessions.create(&numeric, &extra).await.unwrap();
    let got = b.sessions.validate(&numeric).await.unwrap().unwrap();
    assert_eq!(
        got.record.user().unwrap().as_str(),
        "42",
        "integer user ids are accepted"
    );
    assert_eq!(
        got.record.extra.get("rooms"),
        Some(&serde_json::json!(["lobby"])),
        "unknown fields are kept"
    );
}

pub async fn sessions_expire(b: Backends) {
    let id = unique("short");
    b.sessions
        .create(&id, &record(serde_json::json!("dave")))
        .await
        .unwrap();
    assert!(b.sessions.validate(&id).await.unwrap().is_some());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while b.sessions.get(&id).await.unwrap().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a session must expire after its TTL"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(b.sessions.validate(&id).await.unwrap().is_none());
}

pub async fn presence_counts_connections(b: Backends) {
    let r = room("pres");
    let (erin, frank) = (UserId::parse("erin").unwrap(), UserId::parse("frank").unwrap());
    assert!(
        b.presence.add(&r, &erin, 1).await.unwrap(),
        "first connection makes the user present"
    );
    assert!(!b.presence.add(&r, &erin, 2).await.unwrap());
    assert!(b.presence.add(&r, &frank, 3).await.unwrap());
    let list = b.presence.list(&r).await.unwrap();
    assert_eq!(
        list.iter()
            .map(|e| (e.user_id.as_str(), e.connections))
            .collect::<Vec<_>>(),
        vec![("erin", 2), ("frank", 1)]
    );
    assert!(!b.presence.remove(&r, &erin, 1).await.unwrap());
    assert!(
        b.presence.remove(&r, &erin, 2).await.unwrap(),
        "last connection out: user left"
    );
    assert!(
        !b.presence.remove(&r, &erin, 2).await.unwrap(),
        "removing twice is harmless"
    );
    assert_eq!(b.presence.list(&r).await.unwrap().len(), 1);
    assert!(b.presence.remove(&r, &frank, 3).await.unwrap());
    assert!(b.presence.list(&r).await.unwrap().is_empty());
}
