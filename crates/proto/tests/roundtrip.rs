//! Property tests: every frame survives encode → decode unchanged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use switchyard_proto::*;

fn room() -> impl Strategy<Value = RoomName> {
    "[A-Za-z0-9_.:@=-]{1,40}".prop_map(|s| RoomName::parse(&s).unwrap())
}

fn user() -> impl Strategy<Value = UserId> {
    "[a-zA-Z0-9 éü_-]{1,20}".prop_map(|s| UserId::parse(&s).unwrap())
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        ".{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map("[a-z]{1,5}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

fn payload() -> impl Strategy<Value = Payload> {
    json_value().prop_map(|v| Payload::from_value(&v).unwrap())
}

fn reference() -> impl Strategy<Value = Option<Ref>> {
    prop_oneof![
        Just(None),
        any::<u64>().prop_map(|n| Some(Ref::Num(n))),
        "[a-z0-9]{0,10}".prop_map(|s| Some(Ref::Str(s)))
    ]
}

fn position() -> impl Strategy<Value = StreamPosition> {
    (any::<u64>(), "[a-z0-9]{1,12}").prop_map(|(offset, epoch)| StreamPosition { offset, epoch })
}

fn id() -> impl Strategy<Value = Option<String>> {
    proptest::option::of("[a-zA-Z0-9-]{1,30}")
}

fn client_body() -> impl Strategy<Value = ClientBody> {
    prop_oneof![
        "[a-f0-9-]{1,36}".prop_map(|session| ClientBody::Auth { session }),
        (room(), proptest::option::of(position()), any::<bool>()).prop_map(|(room, since, presence)| {
            ClientBody::Join {
                room,
                since,
                presence,
            }
        }),
        room().prop_map(|room| ClientBody::Leave { room }),
        (room(), payload(), id()).prop_map(|(room, data, id)| ClientBody::Publish { room, data, id }),
        (user(), payload(), id()).prop_map(|(to, data, id)| ClientBody::Direct { to, data, id }),
        room().prop_map(|room| ClientBody::Presence { room }),
        (
            room(),
            proptest::option::of(any::<u64>()),
            proptest::option::of(1u32..)
        )
            .prop_map(|(room, since, limit)| ClientBody::History { room, since, limit }),
        ".{1,30}".prop_map(|token| ClientBody::Refresh { token }),
        any::<u64>().prop_map(|upto| ClientBody::InboxAck { upto }),
        Just(ClientBody::Ping),
    ]
}

fn server_frame() -> impl Strategy<Value = ServerFrame> {
    prop_oneof![
        (
            reference(),
            "[a-f0-9-]{1,36}",
            user(),
            "[a-z0-9-]{1,10}",
            any::<u32>()
        )
            .prop_map(
                |(reference, session_id, user_id, node, inbox)| ServerFrame::Welcome {
                    reference,
                    session_id,
                    user_id,
                    node,
                    inbox
                }
            ),
        (reference(), room(), position(), any::<bool>()).prop_map(|(reference, room, p, recovered)| {
            ServerFrame::Joined {
                reference,
                room,
                offset: p.offset,
                epoch: p.epoch,
                recovered,
            }
        }),
        (
            room(),
            any::<u64>(),
            proptest::option::of(user()),
            payload(),
            any::<u64>(),
            id()
        )
            .prop_map(|(room, offset, from, data, ts, id)| ServerFrame::Message {
                room,
                offset,
                from,
                data,
                ts,
                id
            }),
        (
            proptest::option::of(user()),
            payload(),
            any::<u64>(),
            any::<u64>(),
            id()
        )
            .prop_map(|(from, data, ts, seq, id)| ServerFrame::Direct {
                from,
                data,
                ts,
                seq,
                id
            }),
        (
            room(),
            prop::collection::vec(user(), 0..3),
            prop::collection::vec(user(), 0..3)
        )
            .prop_map(|(room, joins, leaves)| ServerFrame::PresenceDiff { room, joins, leaves }),
        (
            reference(),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>()),
            any::<bool>()
        )
            .prop_map(|(reference, offset, seq, duplicate)| ServerFrame::Ack {
                reference,
                offset,
                seq,
                duplicate
            }),
        (reference(), ".{0,40}").prop_map(|(reference, message)| ServerFrame::Error {
            code: ErrorCode::BadRequest,
            message,
            reference
        }),
        (any::<u64>(), "[a-z ]{0,20}")
            .prop_map(|(after_ms, reason)| ServerFrame::Reconnect { after_ms, reason }),
        (payload(), any::<u64>()).prop_map(|(data, ts)| ServerFrame::System { data, ts }),
        reference().prop_map(|reference| ServerFrame::Pong { reference }),
    ]
}

proptest! {
    #[test]
    fn client_frames_round_trip(reference in reference(), body in client_body()) {
        let frame = ClientFrame { reference, body };
        let text = frame.encode();
        let back = decode_client_frame(&text).map_err(|e| TestCaseError::fail(format!("{e:?} for {text}")))?;
        prop_assert_eq!(back, frame);
    }

    #[test]
    fn server_frames_round_trip(frame in server_frame()) {
        let text = frame.encode();
        let back = ServerFrame::decode(&text).map_err(|e| TestCaseError::fail(format!("{e} for {text}")))?;
        prop_assert_eq!(back, frame);
    }

    #[test]
    fn decoder_never_panics(text in ".{0,200}") {
        let _ = decode_client_frame(&text);
    }
}
