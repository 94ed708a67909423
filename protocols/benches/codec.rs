//! MQTT read path, as the gateway's connection task runs it: PUBLISH decode from a buffer that
//! holds many packets (one socket read), the session's per-publish step (decode, note activity,
//! `on_packet`, the ack's completion), and PUBACK encoding.
//!
//! `cargo bench -p weir-protocols --bench codec`; docs/benches.md has figures.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use weir_protocols::mqtt::session::{ConnectDecision, Event, Outcome, Session, SessionLimits};
use weir_protocols::mqtt::{
    encode, AckV5, Connect, Decoder, Packet, Properties, ProtocolVersion, Publish, PublishV5, QoS,
};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Packets in one buffer: about 16 KiB, what the gateway asks of the socket per read.
const PACKETS: usize = 100;
/// Payload of every PUBLISH (a single JSON reading of the load generator's default size).
const PAYLOAD_BYTES: usize = 128;
const TOPIC: &str = "devices/dev-0001/telemetry";

/// The four PUBLISH flavours measured: (name, version, qos).
const CASES: [(&str, ProtocolVersion, QoS); 4] = [
    ("v311_qos0", ProtocolVersion::V311, QoS::AtMostOnce),
    ("v311_qos1", ProtocolVersion::V311, QoS::AtLeastOnce),
    ("v5_qos0", ProtocolVersion::V5, QoS::AtMostOnce),
    ("v5_qos1", ProtocolVersion::V5, QoS::AtLeastOnce),
];

fn publish(version: ProtocolVersion, qos: QoS, pkid: u16) -> Packet {
    let publish = Publish {
        dup: false,
        qos,
        retain: false,
        topic: TOPIC.to_owned(),
        pkid: if qos == QoS::AtMostOnce { 0 } else { pkid },
        payload: Bytes::from(vec![b'x'; PAYLOAD_BYTES]),
    };
    if version.is_v5() {
        Packet::PublishV5(PublishV5 { publish, properties: Properties::default() })
    } else {
        Packet::Publish(publish)
    }
}

/// `PACKETS` PUBLISH packets back to back, as one read from the socket brings them.
fn publish_buffer(version: ProtocolVersion, qos: QoS) -> Bytes {
    let mut out = BytesMut::new();
    for i in 0..PACKETS {
        encode(&publish(version, qos, i as u16 + 1), &mut out);
    }
    out.freeze()
}

/// The decoder an accepted connection of `version` uses (the session's default limits).
fn decoder(version: ProtocolVersion) -> Decoder {
    let limits = SessionLimits::default();
    Decoder {
        version,
        max_packet_size: limits.max_packet_size,
        max_user_properties: limits.max_user_properties,
    }
}

/// A session past an accepted CONNECT of `version`.
fn connected_session(version: ProtocolVersion) -> Session {
    let now = Instant::now();
    let mut session = Session::new(SessionLimits::default(), now);
    let connect = Connect {
        protocol_level: if version.is_v5() { 5 } else { 4 },
        clean_session: true,
        keep_alive_secs: 60,
        client_id: "dev-0001".to_owned(),
        will: None,
        username: None,
        password: None,
    };
    let packet = Packet::connect(connect);
    let mut buf = BytesMut::new();
    encode(&packet, &mut buf);
    let packet = session.decoder().decode(&mut buf).expect("CONNECT decodes").expect("whole CONNECT");
    let event = session.on_packet(packet, 1).expect("CONNECT accepted");
    assert!(matches!(event, Event::Connect(_)), "{event:?}");
    session
        .decide(ConnectDecision::Accept { session_present: false, session_expiry_secs: 0 }, now)
        .expect("accepted");
    session.outgoing().clear();
    session
}

fn decode_publish(c: &mut Criterion) {
    let mut group = c.benchmark_group("mqtt_decode_publish");
    group.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1)).sample_size(30);
    for (name, version, qos) in CASES {
        let buffer = publish_buffer(version, qos);
        group.throughput(Throughput::ElementsAndBytes {
            elements: PACKETS as u64,
            bytes: buffer.len() as u64,
        });
        let decoder = decoder(version);
        group.bench_function(name, |b| {
            b.iter_batched(
                // The copy into a fresh buffer is the socket read, not measured.
                || BytesMut::from(&buffer[..]),
                |mut buf| {
                    while let Some(packet) = decoder.decode(&mut buf).expect("valid PUBLISH") {
                        black_box(packet);
                    }
                    buf
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

/// What `gateway/src/listener/mqtt.rs` (`Connection::step`, then the ack once the record is
/// stored) does per packet, minus payload decoding and the fabric: decode, note activity,
/// `on_packet` (topic checks, the in-flight window), and for QoS 1 `complete`, which encodes
/// the PUBACK into the session's output. The output is cleared once per buffer (the flush).
fn session_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("mqtt_session_step");
    group.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1)).sample_size(30);
    for (name, version, qos) in CASES {
        let buffer = publish_buffer(version, qos);
        group.throughput(Throughput::ElementsAndBytes {
            elements: PACKETS as u64,
            bytes: buffer.len() as u64,
        });
        let mut session = connected_session(version);
        group.bench_function(name, |b| {
            b.iter_batched(
                || BytesMut::from(&buffer[..]),
                |mut buf| {
                    while let Some(packet) = session.decoder().decode(&mut buf).expect("valid PUBLISH") {
                        session.note_activity(Instant::now());
                        match session.on_packet(packet, 1) {
                            Ok(Event::Publish { topic, payload, ack, format, .. }) => {
                                black_box((topic, payload, format));
                                if let Some(id) = ack {
                                    session.complete(id, Outcome::Stored).expect("acked");
                                }
                            }
                            other => panic!("unexpected {other:?}"),
                        }
                    }
                    session.outgoing().clear();
                    buf
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn encode_puback(c: &mut Criterion) {
    let mut group = c.benchmark_group("mqtt_encode_puback");
    group.measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_secs(1)).sample_size(30);
    // A PUBACK is 4 bytes in both versions (MQTT 5 Success without properties).
    group.throughput(Throughput::ElementsAndBytes { elements: PACKETS as u64, bytes: 4 * PACKETS as u64 });
    let mut out = BytesMut::with_capacity(4 * PACKETS);
    group.bench_function("v311", |b| {
        b.iter(|| {
            out.clear();
            for pkid in 1..=PACKETS as u16 {
                encode(&Packet::PubAck(black_box(pkid)), &mut out);
            }
            black_box(&out);
        })
    });
    group.bench_function("v5", |b| {
        b.iter(|| {
            out.clear();
            for pkid in 1..=PACKETS as u16 {
                encode(&Packet::PubAckV5(AckV5::success(black_box(pkid))), &mut out);
            }
            black_box(&out);
        })
    });
    group.finish();
}

criterion_group!(benches, decode_publish, session_step, encode_puback);
criterion_main!(benches);
