//! Seed inputs for every fuzz target, written with weir's own encoders: real packets, frames
//! and payloads in each target's input layout. `tests/fuzz_corpus.rs` (an ignored test) writes
//! them into `protocols/fuzz/corpus/<target>/seed-<name>`.

use bytes::{Bytes, BytesMut};
use prost::Message as _;
use weir_proto::v1::device_payload::Body;
use weir_proto::v1::Hello;
use weir_proto::{metric_value::Kind, DevicePayload, MetricValue, Reading, ReadingBatch};

use crate::framing::{encode_frame, Framing};
use crate::mqtt::{
    encode, AckV5, Auth, ConnAck, ConnAckV5, Connect, ConnectReturnCode, ConnectV5, DisconnectV5, Packet,
    Properties, Publish, PublishV5, QoS, ReasonCode, SubAck, SubAckV5, Subscribe, SubscribeV5,
    SubscriptionOptions, UnsubAckV5, Unsubscribe, UnsubscribeV5, Will,
};

/// One seed: the target it is for, a name, the input.
pub type Seed = (&'static str, String, Vec<u8>);

/// Every seed of every target.
pub fn all() -> Vec<Seed> {
    let mut seeds = Vec::new();
    seeds.extend(mqtt_decode("mqtt_decode_v311", &packets_v3()));
    seeds.extend(mqtt_decode("mqtt_decode_v5", &packets_v5()));
    seeds.extend(mqtt_session());
    seeds.extend(tcp_framing());
    seeds.extend(ws_ingest());
    seeds.extend(payloads("payload_json", &json_payloads()));
    seeds.extend(payloads("payload_protobuf", &protobuf_payloads()));
    seeds
}

fn bytes_of(packets: &[Packet]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for packet in packets {
        encode(packet, &mut out);
    }
    out.to_vec()
}

fn connect(level: u8, client_id: &str) -> Connect {
    Connect {
        protocol_level: level,
        clean_session: true,
        keep_alive_secs: 30,
        client_id: client_id.into(),
        will: None,
        username: None,
        password: None,
    }
}

fn publish(qos: QoS, pkid: u16, topic: &str, payload: &'static [u8]) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        pkid,
        payload: Bytes::from_static(payload),
    }
}

fn user(name: &str, value: &str) -> (String, String) {
    (name.into(), value.into())
}

fn packets_v3() -> Vec<(&'static str, Packet)> {
    let full_connect = Connect {
        clean_session: false,
        keep_alive_secs: 60,
        will: Some(Will {
            topic: "devices/d1/status".into(),
            payload: Bytes::from_static(b"offline"),
            qos: QoS::AtLeastOnce,
            retain: true,
        }),
        username: Some("user".into()),
        password: Some(Bytes::from_static(b"secret")),
        ..connect(4, "d1")
    };
    vec![
        ("connect", Packet::Connect(connect(4, "d1"))),
        ("connect-will-credentials", Packet::Connect(full_connect)),
        ("connect-3.1", Packet::Connect(connect(3, "old-device"))),
        ("connack", Packet::ConnAck(ConnAck { session_present: true, code: ConnectReturnCode::Accepted })),
        (
            "publish-qos0",
            Packet::Publish(publish(QoS::AtMostOnce, 0, "devices/d1/telemetry", br#"{"t":21.5}"#)),
        ),
        ("publish-qos1", Packet::Publish(publish(QoS::AtLeastOnce, 1, "a/b", b"\x0a\x00"))),
        (
            "publish-qos2-dup-retain",
            Packet::Publish(Publish {
                dup: true,
                retain: true,
                ..publish(QoS::ExactlyOnce, 0xFFFF, "t", b"xyz")
            }),
        ),
        ("puback", Packet::PubAck(1)),
        ("pubrec", Packet::PubRec(2)),
        ("pubrel", Packet::PubRel(2)),
        ("pubcomp", Packet::PubComp(2)),
        (
            "subscribe",
            Packet::Subscribe(Subscribe {
                pkid: 5,
                filters: vec![("a/+/c".into(), QoS::AtLeastOnce), ("#".into(), QoS::ExactlyOnce)],
            }),
        ),
        ("suback", Packet::SubAck(SubAck { pkid: 5, return_codes: vec![0, 1, 2, 0x80] })),
        ("unsubscribe", Packet::Unsubscribe(Unsubscribe { pkid: 6, filters: vec!["a/#".into()] })),
        ("unsuback", Packet::UnsubAck(6)),
        ("pingreq", Packet::PingReq),
        ("pingresp", Packet::PingResp),
        ("disconnect", Packet::Disconnect),
    ]
}

fn packets_v5() -> Vec<(&'static str, Packet)> {
    let connect_properties = Properties {
        session_expiry_interval: Some(3600),
        receive_maximum: Some(10),
        maximum_packet_size: Some(1 << 16),
        topic_alias_maximum: Some(8),
        request_response_information: Some(1),
        request_problem_information: Some(0),
        user_properties: vec![user("fw", "1.2.3")],
        authentication_method: Some("SCRAM-SHA-1".into()),
        authentication_data: Some(Bytes::from_static(b"\x01\x02")),
        ..Properties::default()
    };
    let will_properties = Properties {
        will_delay_interval: Some(5),
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(60),
        content_type: Some("text/plain".into()),
        response_topic: Some("r".into()),
        correlation_data: Some(Bytes::from_static(b"c")),
        ..Properties::default()
    };
    let connect5 = ConnectV5 {
        connect: Connect {
            protocol_level: 5,
            will: Some(Will {
                topic: "w".into(),
                payload: Bytes::from_static(b"bye"),
                qos: QoS::ExactlyOnce,
                retain: false,
            }),
            password: Some(Bytes::from_static(b"pw")),
            ..connect(5, "d5")
        },
        properties: connect_properties,
        will_properties,
    };
    let publish_properties = Properties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        topic_alias: Some(3),
        message_expiry_interval: Some(10),
        user_properties: vec![user("k", "v"), user("k", "w")],
        ..Properties::default()
    };
    let connack_properties = Properties {
        receive_maximum: Some(1024),
        maximum_packet_size: Some(1 << 20),
        topic_alias_maximum: Some(16),
        assigned_client_identifier: Some("weir-auto-1".into()),
        server_keep_alive: Some(600),
        session_expiry_interval: Some(0),
        maximum_qos: Some(1),
        retain_available: Some(0),
        wildcard_subscription_available: Some(0),
        subscription_identifier_available: Some(0),
        shared_subscription_available: Some(0),
        response_information: Some("resp".into()),
        server_reference: Some("other".into()),
        reason_string: Some("ok".into()),
        ..Properties::default()
    };
    let diagnostics = Properties {
        reason_string: Some("why".into()),
        user_properties: vec![user("a", "b")],
        ..Properties::default()
    };
    let ack = |pkid, reason| AckV5 { pkid, reason, properties: diagnostics.clone() };
    vec![
        (
            "connect",
            Packet::ConnectV5(Box::new(ConnectV5 {
                connect: connect(5, "d5"),
                properties: Properties::default(),
                will_properties: Properties::default(),
            })),
        ),
        ("connect-full", Packet::ConnectV5(Box::new(connect5))),
        ("connect-3.1.1", Packet::Connect(connect(4, "old"))),
        (
            "connack",
            Packet::ConnAckV5(ConnAckV5 {
                session_present: false,
                reason: ReasonCode::Success,
                properties: connack_properties,
            }),
        ),
        (
            "publish-qos0",
            Packet::PublishV5(PublishV5 {
                publish: publish(QoS::AtMostOnce, 0, "devices/d5/telemetry", br#"{"t":1}"#),
                properties: Properties::default(),
            }),
        ),
        (
            "publish-qos1-properties",
            Packet::PublishV5(PublishV5 {
                publish: publish(QoS::AtLeastOnce, 9, "a/b", br#"{"t":1}"#),
                properties: publish_properties.clone(),
            }),
        ),
        (
            "publish-alias-only",
            Packet::PublishV5(PublishV5 {
                publish: publish(QoS::ExactlyOnce, 10, "", b"\x0a\x00"),
                properties: Properties {
                    topic_alias: Some(3),
                    subscription_identifiers: vec![1, 268_435_455],
                    ..Properties::default()
                },
            }),
        ),
        ("puback", Packet::PubAckV5(AckV5::success(9))),
        ("puback-error", Packet::PubAckV5(ack(9, ReasonCode::PayloadFormatInvalid))),
        ("pubrec", Packet::PubRecV5(ack(10, ReasonCode::Success))),
        ("pubrel", Packet::PubRelV5(AckV5::success(10))),
        ("pubcomp", Packet::PubCompV5(ack(10, ReasonCode::PacketIdentifierNotFound))),
        (
            "subscribe",
            Packet::SubscribeV5(SubscribeV5 {
                pkid: 3,
                properties: Properties {
                    subscription_identifiers: vec![7],
                    user_properties: vec![user("s", "1")],
                    ..Properties::default()
                },
                filters: vec![
                    (
                        "a/+".into(),
                        SubscriptionOptions {
                            qos: QoS::AtLeastOnce,
                            no_local: true,
                            retain_as_published: true,
                            retain_handling: 2,
                        },
                    ),
                    (
                        "b/#".into(),
                        SubscriptionOptions {
                            qos: QoS::AtMostOnce,
                            no_local: false,
                            retain_as_published: false,
                            retain_handling: 0,
                        },
                    ),
                ],
            }),
        ),
        (
            "suback",
            Packet::SubAckV5(SubAckV5 {
                pkid: 3,
                properties: diagnostics.clone(),
                reason_codes: vec![ReasonCode::GrantedQoS1, ReasonCode::ImplementationSpecificError],
            }),
        ),
        (
            "unsubscribe",
            Packet::UnsubscribeV5(UnsubscribeV5 {
                unsubscribe: Unsubscribe { pkid: 4, filters: vec!["a/+".into(), "c".into()] },
                properties: Properties { user_properties: vec![user("u", "2")], ..Properties::default() },
            }),
        ),
        (
            "unsuback",
            Packet::UnsubAckV5(UnsubAckV5 {
                pkid: 4,
                properties: Properties::default(),
                reason_codes: vec![ReasonCode::NoSubscriptionExisted, ReasonCode::Success],
            }),
        ),
        (
            "disconnect",
            Packet::DisconnectV5(DisconnectV5 {
                reason: ReasonCode::DisconnectWithWillMessage,
                properties: Properties {
                    session_expiry_interval: Some(0),
                    server_reference: Some("s".into()),
                    ..diagnostics.clone()
                },
            }),
        ),
        (
            "disconnect-short",
            Packet::DisconnectV5(DisconnectV5 {
                reason: ReasonCode::Success,
                properties: Properties::default(),
            }),
        ),
        (
            "auth",
            Packet::Auth(Auth {
                reason: ReasonCode::ContinueAuthentication,
                properties: Properties {
                    authentication_method: Some("SCRAM-SHA-1".into()),
                    authentication_data: Some(Bytes::from_static(b"data")),
                    ..diagnostics
                },
            }),
        ),
        ("pingreq", Packet::PingReq),
    ]
}

/// One seed per packet (no size limit, no user property cap), one with all of them in a row,
/// and the same row under tight limits.
fn mqtt_decode(target: &'static str, packets: &[(&'static str, Packet)]) -> Vec<Seed> {
    let mut seeds: Vec<Seed> = packets
        .iter()
        .map(|(name, packet)| {
            let mut input = vec![0, u8::MAX];
            input.extend(bytes_of(std::slice::from_ref(packet)));
            (target, (*name).to_owned(), input)
        })
        .collect();
    let all: Vec<Packet> = packets.iter().map(|(_, p)| p.clone()).collect();
    let stream = bytes_of(&all);
    seeds.push((target, "stream".into(), [&[0, u8::MAX][..], &stream].concat()));
    seeds.push((target, "stream-tight-limits".into(), [&[4, 1][..], &stream].concat()));
    seeds
}

/// Session operations, in the layout `fuzzing::session` reads.
#[derive(Default)]
struct Ops(Vec<u8>);

impl Ops {
    fn new(limits: [u8; 4]) -> Self {
        Self(limits.to_vec())
    }

    fn bytes(mut self, packets: &[Packet]) -> Self {
        for chunk in bytes_of(packets).chunks(255) {
            self.0.push(0);
            self.0.push(chunk.len() as u8);
            self.0.extend_from_slice(chunk);
        }
        self
    }

    fn op(mut self, op: &[u8]) -> Self {
        self.0.extend_from_slice(op);
        self
    }

    fn accept(self) -> Self {
        self.op(&[2, 0xE0])
    }
}

fn mqtt_session() -> Vec<Seed> {
    const ADVANCE: u8 = 1;
    const DECIDE: u8 = 2;
    const COMPLETE: u8 = 3;
    const REFUSE: u8 = 4;
    const UNDECODABLE: u8 = 5;
    const SHUTDOWN: u8 = 6;
    const TAKEN_OVER: u8 = 7;
    const ACTIVITY: u8 = 8;
    const IDLE: u8 = 9;
    // max_inflight 3 + 16 topic aliases, 4096-byte packets + 4 user properties, 64-byte client
    // ids, keepalive at most 60 s.
    let limits = [2 | (16 << 3), 7 | (4 << 3), 64, 12];
    let v3 = |p: Publish| Packet::Publish(p);
    let v5 = |p: Publish, properties: Properties| Packet::PublishV5(PublishV5 { publish: p, properties });
    let connect5 = |keep_alive_secs, properties| {
        Packet::ConnectV5(Box::new(ConnectV5 {
            connect: Connect { keep_alive_secs, ..connect(5, "d5") },
            properties,
            will_properties: Properties::default(),
        }))
    };
    let alias = |alias| Properties { topic_alias: Some(alias), ..Properties::default() };
    let seeds = vec![
        (
            "v3-acks-in-order",
            Ops::new(limits)
                .bytes(&[Packet::Connect(connect(4, "d1"))])
                .accept()
                .bytes(&[
                    v3(publish(QoS::AtLeastOnce, 1, "t", b"{}")),
                    v3(publish(QoS::ExactlyOnce, 2, "t", b"{}")),
                    v3(publish(QoS::AtMostOnce, 0, "t", b"{}")),
                    v3(publish(QoS::AtLeastOnce, 3, "t", b"{}")),
                ])
                .op(&[COMPLETE, 1, 2, COMPLETE, 0, 2, UNDECODABLE, 2, COMPLETE, 2, 1])
                .bytes(&[Packet::PubRel(2), Packet::PingReq])
                .op(&[ADVANCE, 0, 100, ACTIVITY, IDLE])
                .bytes(&[Packet::Disconnect]),
        ),
        (
            "v3-qos2-resend",
            Ops::new(limits)
                .bytes(&[Packet::Connect(connect(4, "d1"))])
                .accept()
                .bytes(&[
                    v3(publish(QoS::ExactlyOnce, 7, "t", b"1")),
                    v3(publish(QoS::ExactlyOnce, 7, "t", b"1")),
                ])
                .op(&[COMPLETE, 0, 2])
                .bytes(&[v3(publish(QoS::ExactlyOnce, 7, "t", b"1")), Packet::PubRel(7), Packet::PubRel(8)]),
        ),
        (
            "v3-window-full",
            Ops::new([0, 7, 64, 12])
                .bytes(&[Packet::Connect(connect(4, "d1"))])
                .accept()
                .bytes(&[
                    v3(publish(QoS::AtLeastOnce, 1, "t", b"1")),
                    v3(publish(QoS::AtLeastOnce, 2, "t", b"2")),
                ])
                .op(&[ADVANCE, 0x10, 0, COMPLETE, 0, 2, ADVANCE, 0x10, 0, COMPLETE, 1, 0]),
        ),
        (
            "v3-refused-and-subscribe",
            Ops::new(limits)
                .bytes(&[Packet::Connect(Connect { clean_session: false, ..connect(4, "d1") })])
                .op(&[DECIDE, 0xE1])
                .bytes(&[
                    Packet::Subscribe(Subscribe { pkid: 1, filters: vec![("a/#".into(), QoS::AtLeastOnce)] }),
                    Packet::Unsubscribe(Unsubscribe { pkid: 2, filters: vec!["a/#".into()] }),
                    v3(publish(QoS::AtLeastOnce, 1, "t", b"1")),
                ])
                .op(&[REFUSE, 0]),
        ),
        (
            "v3-connect-refused",
            Ops::new(limits).bytes(&[Packet::Connect(connect(4, "d1"))]).op(&[DECIDE, 0x40]),
        ),
        ("v3-connect-timeout", Ops::new(limits).op(&[ADVANCE, 0x02, 0x00])),
        (
            "v3-decision-timeout",
            Ops::new(limits).bytes(&[Packet::Connect(connect(4, ""))]).op(&[ADVANCE, 0x02, 0x00]),
        ),
        (
            "v3-keepalive-timeout",
            Ops::new(limits).bytes(&[Packet::Connect(connect(4, "d1"))]).accept().op(&[ADVANCE, 0x20, 0x00]),
        ),
        ("v3-unsupported-level", Ops::new(limits).bytes(&[Packet::Connect(connect(6, "d1"))])),
        (
            "v3-shutdown",
            Ops::new(limits)
                .bytes(&[Packet::Connect(connect(4, "d1"))])
                .accept()
                .bytes(&[v3(publish(QoS::AtLeastOnce, 1, "t", b"1"))])
                .op(&[SHUTDOWN, COMPLETE, 0, 2]),
        ),
        (
            "v3-shutdown-before-connect",
            Ops::new(limits).op(&[SHUTDOWN]).bytes(&[Packet::Connect(connect(4, "d1"))]),
        ),
        (
            "v5-aliases-and-acks",
            Ops::new(limits)
                .bytes(&[connect5(0, Properties { maximum_packet_size: Some(200), ..Properties::default() })])
                .accept()
                .bytes(&[
                    v5(publish(QoS::AtLeastOnce, 1, "a/b", b"{}"), alias(1)),
                    v5(publish(QoS::ExactlyOnce, 2, "", b"{}"), alias(1)),
                    v5(
                        publish(QoS::AtMostOnce, 0, "c", b"\x0a\x00"),
                        Properties { content_type: Some("application/x-protobuf".into()), ..alias(2) },
                    ),
                ])
                .op(&[UNDECODABLE, 0, COMPLETE, 0, 2, REFUSE, 1, COMPLETE, 1, 2])
                .bytes(&[
                    Packet::PubRelV5(AckV5::success(2)),
                    Packet::PubRelV5(AckV5::success(3)),
                    Packet::PingReq,
                    Packet::SubscribeV5(SubscribeV5 {
                        pkid: 4,
                        properties: Properties::default(),
                        filters: vec![(
                            "x/#".into(),
                            SubscriptionOptions {
                                qos: QoS::AtMostOnce,
                                no_local: false,
                                retain_as_published: false,
                                retain_handling: 0,
                            },
                        )],
                    }),
                    Packet::UnsubscribeV5(UnsubscribeV5 {
                        unsubscribe: Unsubscribe { pkid: 5, filters: vec!["x/#".into()] },
                        properties: Properties::default(),
                    }),
                    Packet::DisconnectV5(DisconnectV5 {
                        reason: ReasonCode::Success,
                        properties: Properties::default(),
                    }),
                ]),
        ),
        (
            "v5-resumed-session",
            Ops::new(limits)
                .bytes(&[Packet::ConnectV5(Box::new(ConnectV5 {
                    connect: Connect { clean_session: false, ..connect(5, "d5") },
                    properties: Properties { session_expiry_interval: Some(600), ..Properties::default() },
                    will_properties: Properties::default(),
                }))])
                .op(&[DECIDE, 0xE3])
                .bytes(&[Packet::PubRelV5(AckV5::success(9))])
                .op(&[TAKEN_OVER]),
        ),
        (
            "v5-receive-maximum",
            Ops::new([0, 7, 64, 12]).bytes(&[connect5(30, Properties::default())]).accept().bytes(&[
                v5(publish(QoS::AtLeastOnce, 1, "t", b"1"), Properties::default()),
                Packet::PingReq,
                v5(publish(QoS::AtLeastOnce, 2, "t", b"2"), Properties::default()),
            ]),
        ),
        (
            "v5-bad-alias",
            Ops::new(limits)
                .bytes(&[connect5(30, Properties::default())])
                .accept()
                .bytes(&[v5(publish(QoS::AtMostOnce, 0, "", b"1"), alias(5))]),
        ),
        (
            "v5-shutdown-goodbye",
            Ops::new(limits)
                .bytes(&[connect5(
                    30,
                    Properties { request_problem_information: Some(0), ..Properties::default() },
                )])
                .accept()
                .bytes(&[v5(publish(QoS::AtLeastOnce, 1, "t", b"1"), Properties::default())])
                .op(&[SHUTDOWN, COMPLETE, 0, 1]),
        ),
        (
            "v5-refused-auth-method",
            Ops::new(limits).bytes(&[connect5(
                30,
                Properties { authentication_method: Some("x".into()), ..Properties::default() },
            )]),
        ),
        (
            "v5-too-many-user-properties",
            Ops::new(limits).bytes(&[connect5(30, Properties::default())]).accept().bytes(&[v5(
                publish(QoS::AtMostOnce, 0, "t", b"1"),
                Properties { user_properties: vec![user("a", "1"); 5], ..Properties::default() },
            )]),
        ),
    ];
    seeds.into_iter().map(|(name, ops)| ("mqtt_session", name.to_owned(), ops.0)).collect()
}

fn reading_pb(device_id: &str, seq: u64) -> Reading {
    Reading {
        device_id: device_id.into(),
        seq: Some(seq),
        ts_ms: Some(1_700_000_000_000),
        metrics: [
            ("temp".to_string(), MetricValue { kind: Some(Kind::Number(21.5)) }),
            ("door".to_string(), MetricValue { kind: Some(Kind::Flag(true)) }),
            ("mode".to_string(), MetricValue { kind: Some(Kind::Text("eco".into())) }),
        ]
        .into(),
        tags: [("site".to_string(), "plant-7".to_string())].into(),
    }
}

fn protobuf_payloads() -> Vec<(&'static str, Vec<u8>)> {
    let payload = |body| DevicePayload { body: Some(body) }.encode_to_vec();
    vec![
        ("reading", payload(Body::Reading(reading_pb("d1", 1)))),
        ("reading-no-device", payload(Body::Reading(reading_pb("", 2)))),
        (
            "batch",
            payload(Body::Batch(ReadingBatch {
                device_id: "gw".into(),
                readings: vec![reading_pb("", 1), reading_pb("d2", 2), Reading::default()],
            })),
        ),
        ("hello", payload(Body::Hello(Hello { device_id: "d1".into() }))),
        ("empty", Vec::new()),
    ]
}

fn json_payloads() -> Vec<(&'static str, Vec<u8>)> {
    let texts: &[(&str, &str)] = &[
        (
            "flat",
            r#"{"device_id":"d1","seq":1,"ts":1700000000000,"temp":21.5,"on":true,"mode":"eco","x":null}"#,
        ),
        (
            "metrics-tags",
            r#"{"seq":2,"ts":"2024-05-01T12:00:00.250Z","metrics":{"t":1e3,"n":-4},"tags":{"site":"p7","n":3,"b":false}}"#,
        ),
        ("nested", r#"{"gps":{"lat":48.1,"lon":11.5,"fix":{"q":2}},"a.b":1}"#),
        ("batch", r#"{"device_id":"gw","readings":[{"seq":1,"t":1},{"device_id":"d2","seq":2,"t":2}]}"#),
        ("array", r#"[{"device_id":"a","v":1},{"device_id":"b","v":"x"}]"#),
        ("escapes", r#"{"k\u00e9y\n":"v\"\\","\ud83d\ude00":1}"#),
        ("errors", r#"{"seq":-1,"ts":"yesterday","arr":[1,2],"tags":{"t":{}}}"#),
        ("deep", r#"{"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{"i":1}}}}}}}}}"#),
        ("not-json", "temp=21"),
    ];
    texts.iter().map(|(name, text)| (*name, text.as_bytes().to_vec())).collect()
}

/// Each payload with default-like limits (255 readings, 255 fields, 255-byte ids), with keep_raw,
/// and under tight limits.
fn payloads(target: &'static str, payloads: &[(&'static str, Vec<u8>)]) -> Vec<Seed> {
    let mut seeds = Vec::new();
    for (name, payload) in payloads {
        seeds.push((target, (*name).to_owned(), [&[255, 255, 255, 0][..], payload].concat()));
        seeds.push((target, format!("{name}-tight"), [&[1, 2, 2, 1][..], payload].concat()));
    }
    seeds.push((target, "auto".into(), [&[255, 255, 255, 4][..], &payloads[0].1].concat()));
    seeds
}

fn tcp_framing() -> Vec<Seed> {
    let mut lp = Vec::new();
    let hello = DevicePayload { body: Some(Body::Hello(Hello { device_id: "d1".into() })) }.encode_to_vec();
    encode_frame(Framing::LengthPrefixed, &hello, &mut lp);
    encode_frame(Framing::LengthPrefixed, &[], &mut lp);
    let reading = DevicePayload { body: Some(Body::Reading(reading_pb("", 1))) }.encode_to_vec();
    encode_frame(Framing::LengthPrefixed, &reading, &mut lp);
    let mut lines = Vec::new();
    encode_frame(Framing::Lines, br#"{"hello":"d1"}"#, &mut lines);
    lines.extend_from_slice(b"\r\n   \n");
    encode_frame(Framing::Lines, br#"{"seq":1,"t":21.5}"#, &mut lines);
    lines.extend_from_slice(b"{\"seq\":2}\r\n{\"last\":true}");
    // [flags, max (u16), boundary count, boundaries (u16 each), stream]
    let with = |flags: u8, max: u16, boundaries: &[u16], stream: &[u8]| {
        let mut input = vec![flags];
        input.extend_from_slice(&max.to_be_bytes());
        input.push(boundaries.len() as u8);
        for b in boundaries {
            input.extend_from_slice(&b.to_be_bytes());
        }
        input.extend_from_slice(stream);
        input
    };
    vec![
        ("tcp_framing", "length-prefixed".into(), with(0, 1024, &[3, 9], &lp)),
        ("tcp_framing", "length-prefixed-too-large".into(), with(0, 8, &[], &lp)),
        ("tcp_framing", "length-prefixed-truncated".into(), with(0, 1024, &[2], &lp[..lp.len() - 3])),
        ("tcp_framing", "lines".into(), with(1, 1024, &[1, 15, 16, 30], &lines)),
        ("tcp_framing", "lines-too-large".into(), with(1, 12, &[5], &lines)),
    ]
}

fn ws_ingest() -> Vec<Seed> {
    let reading = DevicePayload { body: Some(Body::Reading(reading_pb("", 3))) }.encode_to_vec();
    let with = |flags: u8, device: &str, message: &[u8]| {
        [&[flags, device.len() as u8][..], device.as_bytes(), message].concat()
    };
    vec![
        ("ws_ingest", "text".into(), with(0, "d1", br#"{"seq":5,"t":21.5}"#)),
        (
            "ws_ingest",
            "text-array".into(),
            with(4, "", br#"[{"device_id":"a","seq":1},{"device_id":"b","seq":9}]"#),
        ),
        (
            "ws_ingest",
            "text-undecodable".into(),
            with(2, "d1", br#"{"seq":"x","tags":[1],"line\nbreak":{"deep":[]}}"#),
        ),
        ("ws_ingest", "binary".into(), with(1, "d1", &reading)),
        ("ws_ingest", "binary-undecodable".into(), with(5, "d1", b"\xff\xff\xff")),
        ("ws_ingest", "bad-device".into(), with(0, "a+b", b"{}")),
    ]
}
