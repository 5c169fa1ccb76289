//! Unit tests of the hub: encode-once fan-out, the two-phase join and registration, membership
//! clean-up and subscription bookkeeping.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::Weak;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use switchyard_core::Utf8Bytes;
use switchyard_core::backend::memory::MemoryBackend;
use switchyard_core::backend::*;
use switchyard_core::clock::Clock;
use switchyard_core::conn::{ConnKind, Connection};
use switchyard_core::hub::Hub;
use switchyard_core::metrics::Metrics;
use switchyard_core::queue::{Outbound, QueueLimits};
use switchyard_proto::{CloseCode, Payload, RoomName, StreamPosition, UserId};

/// The memory broker, counting subscription changes.
struct CountingBroker {
    inner: Arc<MemoryBackend>,
    subscribes: AtomicUsize,
    unsubscribes: AtomicUsize,
}

#[async_trait]
impl Broker for CountingBroker {
    fn attach(&self, sink: Weak<dyn DeliverySink>) {
        self.inner.attach(sink)
    }
    async fn subscribe(&self, room: &RoomName) -> BackendResult<()> {
        self.subscribes.fetch_add(1, Ordering::SeqCst);
        self.inner.subscribe(room).await
    }
    async fn unsubscribe(&self, room: &RoomName) -> BackendResult<()> {
        self.unsubscribes.fetch_add(1, Ordering::SeqCst);
        self.inner.unsubscribe(room).await
    }
    async fn publish(&self, room: &RoomName, p: NewPublication) -> BackendResult<PublishOutcome> {
        self.inner.publish(room, p).await
    }
    async fn position(&self, room: &RoomName) -> BackendResult<StreamPosition> {
        self.inner.position(room).await
    }
    async fn history(&self, room: &RoomName, after: Option<u64>, limit: usize) -> BackendResult<HistoryPage> {
        self.inner.history(room, after, limit).await
    }
    async fn recover(&self, room: &RoomName, since: &StreamPosition) -> BackendResult<Recovery> {
        self.inner.recover(room, since).await
    }
    async fn presence_event(&self, diff: &PresenceDiff) -> BackendResult<()> {
        self.inner.presence_event(diff).await
    }
    async fn broadcast(&self, message: SystemMessage) -> BackendResult<()> {
        self.inner.broadcast(message).await
    }
    async fn send_direct(&self, to: &UserId, message: NewDirect) -> BackendResult<DirectOutcome> {
        self.inner.send_direct(to, message).await
    }
    async fn inbox(&self, user: &UserId) -> BackendResult<Vec<Arc<DirectMessage>>> {
        self.inner.inbox(user).await
    }
    async fn inbox_ack(&self, user: &UserId, upto: u64) -> BackendResult<()> {
        self.inner.inbox_ack(user, upto).await
    }
    async fn disconnect(&self, target: &DisconnectTarget) -> BackendResult<()> {
        self.inner.disconnect(target).await
    }
    async fn check(&self) -> BackendResult<()> {
        Ok(())
    }
}

struct Fixture {
    broker: Arc<CountingBroker>,
    hub: Arc<Hub>,
}

fn fixture(capacity: usize) -> Fixture {
    let broker = Arc::new(CountingBroker {
        inner: MemoryBackend::new(BackendSettings::default()),
        subscribes: AtomicUsize::new(0),
        unsubscribes: AtomicUsize::new(0),
    });
    let hub = Hub::new(broker.clone(), Clock::new(), Arc::new(Metrics::new()), capacity);
    Fixture { broker, hub }
}

fn conn(hub: &Hub, user: &str, session: &str, kind: ConnKind) -> Arc<Connection> {
    let limits = QueueLimits {
        capacity: 100,
        ..QueueLimits::default()
    };
    Connection::new(
        hub.next_conn_id(),
        UserId::parse(user).unwrap(),
        Arc::from(session),
        kind,
        limits,
        0,
    )
}

fn room(name: &str) -> RoomName {
    RoomName::parse(name).unwrap()
}

fn texts(conn: &Connection) -> Vec<Utf8Bytes> {
    conn.queue
        .take()
        .frames
        .into_iter()
        .filter_map(|(frame, _)| match frame {
            Outbound::Text(text) => Some(text),
            Outbound::Ping => None,
        })
        .collect()
}

fn publication(room_name: &str, offset: u64) -> Arc<Publication> {
    Arc::new(Publication {
        room: room(room_name),
        offset,
        epoch: Arc::from("e"),
        from: Some(UserId::parse("alice").unwrap()),
        data: Payload::from_value(&offset).unwrap(),
        ts: 1,
        id: None,
    })
}

fn join_live(hub: &Hub, name: &str, conn: &Arc<Connection>) {
    assert!(hub.begin_join(&room(name), conn, false));
    hub.complete_join(&room(name), conn, None, &[], 0);
}

#[test]
fn fan_out_encodes_once_per_protocol() {
    let f = fixture(100);
    let a = conn(&f.hub, "a", "s1", ConnKind::Native);
    let b = conn(&f.hub, "b", "s2", ConnKind::Native);
    let seed = conn(&f.hub, "c", "s3", ConnKind::Seed);
    for c in [&a, &b, &seed] {
        join_live(&f.hub, "r", c);
    }
    f.hub.publication(publication("r", 1));
    let (ta, tb, ts) = (texts(&a), texts(&b), texts(&seed));
    assert_eq!(ta.len(), 1);
    assert_eq!(
        ta[0].as_str().as_ptr(),
        tb[0].as_str().as_ptr(),
        "native members share one encoded frame"
    );
    assert!(ta[0].as_str().contains(r#""type":"message""#) && ta[0].as_str().contains(r#""offset":1"#));
    assert_eq!(
        ts[0].as_str(),
        r#"{"type":"message","message":1,"user_id":"alice"}"#
    );
    f.hub.publication(publication("other", 1));
    assert!(texts(&a).is_empty(), "only members of the room get it");
}

#[test]
fn join_merges_backlog_and_live_publications_without_gaps_or_repeats() {
    let f = fixture(100);
    let a = conn(&f.hub, "a", "s1", ConnKind::Native);
    assert!(f.hub.begin_join(&room("r"), &a, false));
    assert!(
        !f.hub.begin_join(&room("r"), &a, false),
        "joining twice is refused"
    );
    // While the history read is in flight, offsets 3..=5 arrive live; history covered up to 4.
    for offset in 3..=5 {
        f.hub.publication(publication("r", offset));
    }
    assert!(texts(&a).is_empty(), "nothing is sent before the join completes");
    let backlog = [publication("r", 2), publication("r", 3), publication("r", 4)];
    f.hub.complete_join(
        &room("r"),
        &a,
        Some(Utf8Bytes::from("joined".to_string())),
        &backlog,
        4,
    );
    f.hub.publication(publication("r", 6));
    let got: Vec<String> = texts(&a).iter().map(|t| t.to_string()).collect();
    assert_eq!(got[0], "joined");
    let offsets: Vec<u64> = got[1..]
        .iter()
        .map(|t| {
            serde_json::from_str::<serde_json::Value>(t).unwrap()["offset"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(offsets, vec![2, 3, 4, 5, 6]);
}

#[test]
fn a_room_too_fast_for_a_joining_member_closes_it_as_slow() {
    let f = fixture(3);
    let a = conn(&f.hub, "a", "s1", ConnKind::Native);
    f.hub.begin_join(&room("r"), &a, false);
    for offset in 1..=4 {
        f.hub.publication(publication("r", offset));
    }
    assert_eq!(
        a.queue.take().close.map(|c| c.code),
        Some(CloseCode::SlowConsumer)
    );
}

#[test]
fn direct_messages_wait_for_registration_and_skip_what_the_inbox_had() {
    let f = fixture(100);
    let a = conn(&f.hub, "bob", "s1", ConnKind::Native);
    f.hub.register(&a);
    let direct = |seq| {
        Arc::new(DirectMessage {
            to: UserId::parse("bob").unwrap(),
            from: None,
            data: Payload::from_value(&seq).unwrap(),
            ts: 1,
            seq,
            id: None,
        })
    };
    f.hub.direct(direct(2));
    f.hub.direct(direct(3));
    f.hub.complete_register(
        &a,
        Utf8Bytes::from("welcome".to_string()),
        &[direct(1), direct(2)],
    );
    f.hub.direct(direct(4));
    let got: Vec<String> = texts(&a).iter().map(|t| t.to_string()).collect();
    assert_eq!(got[0], "welcome");
    let seqs: Vec<u64> = got[1..]
        .iter()
        .map(|t| {
            serde_json::from_str::<serde_json::Value>(t).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    assert_eq!(f.hub.connection_count(), 1);
}

#[test]
fn unregister_releases_everything() {
    let f = fixture(100);
    let a = conn(&f.hub, "a", "shared", ConnKind::Native);
    let b = conn(&f.hub, "a", "shared", ConnKind::Native);
    for c in [&a, &b] {
        f.hub.register(c);
        f.hub.complete_register(c, Utf8Bytes::from("w".to_string()), &[]);
        join_live(&f.hub, "r1", c);
    }
    join_live(&f.hub, "r2", &a);
    assert_eq!(f.hub.member_count(&room("r1")), 2);
    let (mut rooms, last) = f.hub.unregister(&a);
    rooms.sort();
    assert_eq!(rooms, vec![room("r1"), room("r2")]);
    assert!(!last, "the session still has a connection");
    assert_eq!(f.hub.member_count(&room("r1")), 1);
    assert_eq!(f.hub.member_count(&room("r2")), 0);
    assert_eq!(f.hub.user_connections(&UserId::parse("a").unwrap()).len(), 1);
    let (_, last) = f.hub.unregister(&b);
    assert!(last);
    assert_eq!(f.hub.connection_count(), 0);
    assert!(f.hub.user_connections(&UserId::parse("a").unwrap()).is_empty());
}

#[tokio::test]
async fn one_broker_subscription_per_room_while_it_has_members() {
    let f = fixture(100);
    let a = conn(&f.hub, "a", "s1", ConnKind::Native);
    let b = conn(&f.hub, "b", "s2", ConnKind::Native);
    join_live(&f.hub, "r", &a);
    f.hub.sync_subscription(&room("r")).await.unwrap();
    join_live(&f.hub, "r", &b);
    f.hub.sync_subscription(&room("r")).await.unwrap();
    assert_eq!(
        f.broker.subscribes.load(Ordering::SeqCst),
        1,
        "the node subscribes once, not per connection"
    );
    assert!(f.hub.leave(&room("r"), &a));
    f.hub.sync_subscription(&room("r")).await.unwrap();
    assert_eq!(f.broker.unsubscribes.load(Ordering::SeqCst), 0);
    assert!(f.hub.leave(&room("r"), &b));
    assert!(!f.hub.leave(&room("r"), &b));
    f.hub.sync_subscription(&room("r")).await.unwrap();
    assert_eq!(
        f.broker.unsubscribes.load(Ordering::SeqCst),
        1,
        "dropped with the last local member"
    );
    // A publication now reaches nobody (and the broker no longer delivers the room here).
    f.broker
        .publish(
            &room("r"),
            NewPublication {
                from: None,
                data: Payload::from_value(&1).unwrap(),
                id: None,
            },
        )
        .await
        .unwrap();
    assert!(texts(&a).is_empty() && texts(&b).is_empty());
}

#[test]
fn system_messages_reach_every_registered_connection() {
    let f = fixture(100);
    let a = conn(&f.hub, "a", "s1", ConnKind::Native);
    let pending = conn(&f.hub, "b", "s2", ConnKind::Native);
    f.hub.register(&a);
    f.hub.complete_register(&a, Utf8Bytes::from("w".to_string()), &[]);
    f.hub.register(&pending);
    f.hub.system(Arc::new(SystemMessage {
        data: Payload::from_value(&"hi").unwrap(),
        ts: 1,
    }));
    let got = texts(&a);
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].as_str(), r#"{"type":"system","data":"hi","ts":1}"#);
    assert!(texts(&pending).is_empty(), "not before its welcome");
}
