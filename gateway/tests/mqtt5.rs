//! MQTT 5 (and 3.1) on the same listener as 3.1.1, with real clients — stock `mosquitto_pub`,
//! rumqttc v5, and a raw client on weir's own codec for exact bytes — reading results back from
//! the SQLite sink: properties pick the payload decoder, an undecodable payload is answered 0x99
//! after its dead letter is stored, Receive Maximum is the backpressure, and each violation is
//! announced with its reason code.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use prost::Message;
use tokio::io::AsyncWriteExt;
use weir_protocols::mqtt::{
    ConnAckV5, Connect, ConnectV5, Packet, Properties, ProtocolVersion, Publish, PublishV5, QoS, ReasonCode,
};

/// Generous bound for anything that should happen "at once".
const PROMPTLY: Duration = Duration::from_secs(5);

/// Opens an MQTT 5 connection with `properties` on its CONNECT; returns the accepting CONNACK.
async fn connect(
    addr: std::net::SocketAddr,
    client_id: &str,
    properties: Properties,
) -> (RawClient, ConnAckV5) {
    let (client, connack) = RawClient::connect_v5(addr, connect_v5(client_id, 60, properties)).await;
    assert_eq!(connack.reason, ReasonCode::Success, "CONNACK refused: {connack:?}");
    (client, connack)
}

fn connect_v5(client_id: &str, keep_alive_secs: u16, properties: Properties) -> ConnectV5 {
    ConnectV5 {
        connect: Connect {
            protocol_level: 5,
            clean_session: true,
            keep_alive_secs,
            client_id: client_id.into(),
            will: None,
            username: None,
            password: None,
        },
        properties,
        will_properties: Properties::default(),
    }
}

fn publish_v5(qos: QoS, pkid: u16, topic: &str, payload: impl Into<Bytes>, properties: Properties) -> Packet {
    Packet::PublishV5(PublishV5 {
        publish: Publish {
            dup: false,
            qos,
            retain: false,
            topic: topic.into(),
            pkid: if qos == QoS::AtMostOnce { 0 } else { pkid },
            payload: payload.into(),
        },
        properties,
    })
}

/// `{protocol="mqtt",reason=...}` samples of `name`, by reason.
fn by_reason(gw: &TestGateway, name: &str) -> BTreeMap<String, u64> {
    let text = gw.gateway.metrics().encode();
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains("protocol=\"mqtt\""))
        .filter_map(|l| {
            let reason = l.split("reason=\"").nth(1)?.split('"').next()?;
            let value = l.rsplit(' ').next()?.parse::<f64>().ok()? as u64;
            Some((reason.to_owned(), value))
        })
        .collect()
}

fn mosquitto_pub(addr: std::net::SocketAddr, version: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new("mosquitto_pub")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string(), "-V", version])
        .args(args)
        .output()
        .expect("mosquitto_pub must be installed (deploy/local/install-deps.sh installs mosquitto-clients)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_mosquitto_pub_v5_v311_and_v31_at_each_qos() {
    let gw = TestGateway::start("").await;
    let addr = gw.mqtt_addr();
    let mut expected = Vec::new();
    for (n, version) in ["mqttv5", "mqttv311", "mqttv31"].into_iter().enumerate() {
        let device = format!("mosq-{version}");
        for qos in 0..3u8 {
            let seq = n as i64 * 10 + i64::from(qos);
            let payload = format!(r#"{{"seq":{seq},"temp":21.5}}"#);
            let topic = format!("devices/{device}/telemetry");
            let qos = qos.to_string();
            let mut args = vec!["-q", &qos, "-i", &device, "-t", &topic, "-m", &payload];
            if version == "mqttv5" {
                // Properties ride along: a content type, a user property, a session expiry.
                args.extend([
                    "-D",
                    "publish",
                    "content-type",
                    "application/json", // JSON, whatever `payload` says
                    "-D",
                    "publish",
                    "user-property",
                    "site",
                    "lab",
                    "-D",
                    "connect",
                    "session-expiry-interval",
                    "60",
                ]);
            }
            let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
            let out = tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                mosquitto_pub(addr, version, &args)
            })
            .await
            .unwrap();
            assert!(
                out.status.success(),
                "mosquitto_pub -V {version} -q {qos}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            expected.push((device.clone(), seq));
        }
    }
    expected.sort();
    let db = gw.db_path();
    // QoS 1/2 rows are committed before mosquitto_pub exits; QoS 0 rows follow with their batch.
    assert!(eventually(PROMPTLY, || rows(&db).len() == expected.len()).await, "{:?}", rows(&db));
    assert_eq!(rows(&db), expected, "every message once, from every protocol version");
    assert_eq!(gw.metric("weir_protocol_errors_total"), 0);
    assert_eq!(count(&db, "SELECT count(*) FROM dead_letter"), 0);
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_v5_with_properties_and_a_0x99_for_an_undecodable_payload() {
    use rumqttc::v5::mqttbytes::v5::{Packet as RPacket, PubAckReason, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS as RQoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    // The listener expects JSON; properties say otherwise per message.
    let gw = TestGateway::start(
        "[[listeners]]\nprotocol = \"mqtt\"\nlisten = \"127.0.0.1:0\"\npayload = \"json\"\nmax_topic_aliases = 4\n\
         [fabric]\nlinger_ms = 1\n",
    )
    .await;
    let addr = gw.mqtt_addr();
    let mut options = MqttOptions::new("rumq5-dev", addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let topic = "devices/rumq5-dev/telemetry";
    let json = |seq: u64| Bytes::from(format!(r#"{{"seq":{seq},"metrics":{{"temp":21.5}}}}"#));
    let protobuf = |seq: u64| {
        let reading = weir_proto::Reading { seq: Some(seq), ..Default::default() };
        let payload =
            weir_proto::DevicePayload { body: Some(weir_proto::v1::device_payload::Body::Reading(reading)) };
        Bytes::from(payload.encode_to_vec())
    };
    let sender = tokio::spawn(async move {
        let props =
            |content_type: Option<&str>, indicator: Option<u8>, alias: Option<u16>| PublishProperties {
                content_type: content_type.map(str::to_owned),
                payload_format_indicator: indicator,
                topic_alias: alias,
                user_properties: vec![("site".into(), "lab".into()), ("rack".into(), "7".into())],
                ..Default::default()
            };
        let send = |topic: &'static str, qos, payload: Bytes, properties| {
            let client = client.clone();
            async move { client.publish_with_properties(topic, qos, false, payload, properties).await.unwrap() }
        };
        // 1: JSON by payload format indicator, defining topic alias 1.
        send(topic, RQoS::AtLeastOnce, json(1), props(None, Some(1), Some(1))).await;
        // 2: protobuf by content type, on the alias alone (empty topic).
        send("", RQoS::AtLeastOnce, protobuf(2), props(Some("application/x-protobuf"), None, Some(1))).await;
        // 3: QoS 2, JSON by content type with parameters.
        send(topic, RQoS::ExactlyOnce, json(3), props(Some("application/json; charset=utf-8"), None, None))
            .await;
        // 4: says JSON, is not: dead-lettered and answered 0x99.
        send(
            topic,
            RQoS::AtLeastOnce,
            Bytes::from_static(b"temp=21"),
            props(Some("application/json"), None, None),
        )
        .await;
        // 5: the connection keeps working after the 0x99.
        send("", RQoS::AtLeastOnce, protobuf(5), props(Some("application/protobuf"), None, Some(1))).await;
        client
    });

    let mut pubacks = Vec::new();
    let mut pubcomps = 0;
    let db = gw.db_path();
    tokio::time::timeout(Duration::from_secs(20), async {
        while pubacks.len() < 4 || pubcomps < 1 {
            match eventloop.poll().await.expect("rumqttc event loop") {
                Event::Incoming(RPacket::PubAck(ack)) => {
                    if ack.reason == PubAckReason::PayloadFormatInvalid {
                        // The dead letter is committed before the device is told.
                        assert_eq!(count(&db, "SELECT count(*) FROM dead_letter"), 1);
                        let reason = ack.properties.and_then(|p| p.reason_string).unwrap_or_default();
                        assert!(reason.contains("JSON"), "{reason}");
                    }
                    pubacks.push(ack.reason);
                }
                Event::Incoming(RPacket::PubComp(_)) => pubcomps += 1,
                _ => {}
            }
        }
    })
    .await
    .expect("every message acknowledged");
    let _client = sender.await.unwrap();
    assert_eq!(
        pubacks,
        [
            PubAckReason::Success,
            PubAckReason::Success,
            PubAckReason::PayloadFormatInvalid,
            PubAckReason::Success
        ]
    );
    let expected: Vec<_> = [1, 2, 3, 5].into_iter().map(|s| ("rumq5-dev".to_string(), s)).collect();
    assert_eq!(rows(&db), expected);
    let sources: Vec<String> = {
        let conn = rusqlite::Connection::open(&db).unwrap();
        let mut stmt = conn.prepare("SELECT source FROM telemetry ORDER BY seq").unwrap();
        stmt.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
    };
    assert_eq!(sources, [topic; 4], "aliases resolve to the topic they were given");
    let (dead_source, raw): (String, Vec<u8>) = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT source, raw FROM dead_letter", [], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap();
    assert_eq!((dead_source.as_str(), raw.as_slice()), (topic, &b"temp=21"[..]));
    assert_eq!(gw.metric("weir_protocol_errors_total"), 0);
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_maximum_is_the_backpressure_and_pings_are_answered_while_stalled() {
    const RECEIVE_MAXIMUM: usize = 5;
    const MESSAGES: u16 = 40;
    let gw = TestGateway::start(&format!(
        "[[listeners]]\nprotocol = \"mqtt\"\nlisten = \"127.0.0.1:0\"\nmax_inflight = {RECEIVE_MAXIMUM}\n\
         [fabric]\nlinger_ms = 1\n"
    ))
    .await;
    let db = gw.db_path();
    let lock = WriteLock::take(&db);
    let (mut client, connack) = connect(gw.mqtt_addr(), "rm-dev", Properties::default()).await;
    let window = usize::from(connack.properties.receive_maximum.expect("Receive Maximum advertised"));
    assert_eq!(window, RECEIVE_MAXIMUM);

    // The client honours Receive Maximum: it sends while fewer than `window` await PUBACK.
    let mut next: u16 = 1;
    let mut acked = Vec::new();
    let mut outstanding = 0usize;
    let mut most_outstanding = 0usize;
    while outstanding < window {
        let payload = reading("rm-dev", next.into());
        client.send(&publish_v5(QoS::AtLeastOnce, next, "t", payload, Properties::default())).await;
        next += 1;
        outstanding += 1;
        most_outstanding = most_outstanding.max(outstanding);
    }
    // Stalled: exactly the window is inside weir, nothing is acknowledged, and weir still
    // answers PINGREQ (a 3.1.1 device at its bound would not be read at all).
    assert!(eventually(PROMPTLY, || gw.metric("weir_records_enqueued_total") == window as u64).await);
    for _ in 0..3 {
        client.send(&Packet::PingReq).await;
        assert_eq!(client.recv_within(PROMPTLY).await, Ok(Some(Packet::PingResp)), "PINGRESP while stalled");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(gw.metric("weir_messages_received_total"), window as u64);
    assert_eq!(gw.metric("weir_records_committed_total"), 0);
    assert_eq!(count(&db, "SELECT count(*) FROM telemetry"), 0);

    lock.release();
    while acked.len() < usize::from(MESSAGES) {
        match client.recv_within(Duration::from_secs(10)).await {
            Ok(Some(Packet::PubAckV5(ack))) => {
                assert_eq!(ack.reason, ReasonCode::Success);
                assert!(
                    count(&db, "SELECT count(*) FROM telemetry") as usize > acked.len(),
                    "acked after the commit"
                );
                acked.push(ack.pkid);
                outstanding -= 1;
            }
            other => panic!("expected PUBACK, got {other:?}"),
        }
        while outstanding < window && next <= MESSAGES {
            let payload = reading("rm-dev", next.into());
            client.send(&publish_v5(QoS::AtLeastOnce, next, "t", payload, Properties::default())).await;
            next += 1;
            outstanding += 1;
            most_outstanding = most_outstanding.max(outstanding);
        }
    }
    assert_eq!(acked, (1..=MESSAGES).collect::<Vec<_>>(), "every message acknowledged, in order");
    assert_eq!(most_outstanding, RECEIVE_MAXIMUM, "never more than Receive Maximum unacknowledged");
    assert_eq!(rows(&db).len(), usize::from(MESSAGES));
    assert_eq!(gw.metric("weir_protocol_errors_total"), 0);
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn violations_are_announced_with_their_reason_codes() {
    let gw = TestGateway::start(
        "[[listeners]]\nprotocol = \"mqtt\"\nlisten = \"127.0.0.1:0\"\nmax_inflight = 2\nmax_topic_aliases = 4\n\
         max_packet_bytes = 1024\nmax_user_properties = 3\n[fabric]\nlinger_ms = 1\n",
    )
    .await;
    let addr = gw.mqtt_addr();
    let db = gw.db_path();

    // A 3.1.1 device on the same listener still works, before and after the MQTT 5 ones.
    let mut old = RawClient::connect(addr, "v311-dev").await;
    old.send(&publish(QoS::AtLeastOnce, 1, "t", reading("v311-dev", 1))).await;
    assert_eq!(old.recv_within(PROMPTLY).await, Ok(Some(Packet::PubAck(1))));

    // Empty client id: an Assigned Client Identifier, used as the device id.
    let (mut anon, connack) = connect(addr, "", Properties::default()).await;
    let assigned = connack.properties.assigned_client_identifier.expect("Assigned Client Identifier");
    assert!(assigned.starts_with("weir-auto-"), "{assigned}");
    assert_eq!(connack.properties.maximum_packet_size, Some(1024));
    assert_eq!(connack.properties.topic_alias_maximum, Some(4));
    assert_eq!(connack.properties.receive_maximum, Some(2));
    assert!(!connack.session_present);
    anon.send(&publish_v5(QoS::AtLeastOnce, 1, "t", r#"{"seq":1}"#, Properties::default())).await;
    assert!(matches!(anon.recv_within(PROMPTLY).await, Ok(Some(Packet::PubAckV5(_)))));
    assert_eq!(count(&db, &format!("SELECT count(*) FROM telemetry WHERE device_id = '{assigned}'")), 1);

    // Receive Maximum exceeded: with the sink stalled, a third unacknowledged QoS 1 message.
    let lock = WriteLock::take(&db);
    let (mut greedy, _) = connect(addr, "greedy-dev", Properties::default()).await;
    for pkid in 1..=3u16 {
        greedy
            .send(&publish_v5(
                QoS::AtLeastOnce,
                pkid,
                "t",
                reading("greedy-dev", pkid.into()),
                Properties::default(),
            ))
            .await;
    }
    let reason = greedy.expect_disconnect(ReasonCode::ReceiveMaximumExceeded).await;
    assert!(reason.contains("Receive Maximum"), "{reason}");
    lock.release();

    // Topic alias above the Topic Alias Maximum.
    let (mut aliasing, _) = connect(addr, "alias-dev", Properties::default()).await;
    let alias5 = Properties { topic_alias: Some(5), ..Properties::default() };
    aliasing.send(&publish_v5(QoS::AtMostOnce, 0, "t", "{}", alias5)).await;
    aliasing.expect_disconnect(ReasonCode::TopicAliasInvalid).await;

    // An unknown alias with an empty topic is a protocol error.
    let (mut unknown, _) = connect(addr, "unknown-alias-dev", Properties::default()).await;
    let alias2 = Properties { topic_alias: Some(2), ..Properties::default() };
    unknown.send(&publish_v5(QoS::AtMostOnce, 0, "", "{}", alias2)).await;
    unknown.expect_disconnect(ReasonCode::ProtocolError).await;

    // A packet above max_packet_bytes is refused from its header: only the header is sent.
    let (mut big, _) = connect(addr, "big-dev", Properties::default()).await;
    big.stream
        .write_all(&[
            0x30, // PUBLISH QoS 0
            0xD0, 0x0F, // remaining length 2000
        ])
        .await
        .unwrap();
    let reason = big.expect_disconnect(ReasonCode::PacketTooLarge).await;
    assert!(reason.contains("1024"), "{reason}");

    // More user properties than max_user_properties.
    let (mut chatty, _) = connect(addr, "chatty-dev", Properties::default()).await;
    let four = Properties { user_properties: vec![("k".into(), "v".into()); 4], ..Properties::default() };
    chatty.send(&publish_v5(QoS::AtMostOnce, 0, "t", "{}", four)).await;
    let reason = chatty.expect_disconnect(ReasonCode::QuotaExceeded).await;
    assert!(reason.contains("user properties"), "{reason}");

    // Enhanced authentication is not supported: CONNACK 0x8C.
    let mut auth = RawClient::open_as(addr, ProtocolVersion::V5).await;
    let method = Properties { authentication_method: Some("SCRAM-SHA-256".into()), ..Properties::default() };
    auth.send(&Packet::ConnectV5(Box::new(connect_v5("auth-dev", 60, method)))).await;
    match auth.recv_within(PROMPTLY).await {
        Ok(Some(Packet::ConnAckV5(connack))) => {
            assert_eq!(connack.reason, ReasonCode::BadAuthenticationMethod)
        }
        other => panic!("expected CONNACK 0x8C, got {other:?}"),
    }
    assert_eq!(auth.recv_within(PROMPTLY).await, Ok(None));

    // The 3.1.1 device was untouched by all of this.
    old.send(&publish(QoS::AtLeastOnce, 2, "t", reading("v311-dev", 2))).await;
    assert_eq!(old.recv_within(PROMPTLY).await, Ok(Some(Packet::PubAck(2))));
    old.send(&Packet::Disconnect).await;
    assert!(old.closed_within(PROMPTLY).await);

    let expected: BTreeMap<String, u64> = [
        ("bad_authentication_method", 1),
        ("packet_too_large", 1),
        ("receive_maximum_exceeded", 1),
        ("too_many_user_properties", 1),
        ("topic_alias_invalid", 1),
        ("unknown_topic_alias", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert!(eventually(PROMPTLY, || by_reason(&gw, "weir_protocol_errors_total") == expected).await);
    assert_eq!(by_reason(&gw, "weir_protocol_errors_total"), expected);
    assert!(
        eventually(PROMPTLY, || by_reason(&gw, "weir_connections_closed_total").get("protocol_error")
            == Some(&6))
        .await,
        "{:?}",
        by_reason(&gw, "weir_connections_closed_total")
    );
    // Greedy's two admitted messages are stored once the sink resumes; the refused one is not.
    let greedy_rows = || count(&db, "SELECT count(*) FROM telemetry WHERE device_id = 'greedy-dev'");
    assert!(eventually(PROMPTLY, || greedy_rows() == 2).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(greedy_rows(), 2);
    assert_eq!(count(&db, "SELECT count(*) FROM telemetry WHERE device_id = 'v311-dev'"), 2);
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_during_shutdown_is_told_server_busy() {
    let gw = TestGateway::start("").await;
    let addr = gw.mqtt_addr();
    let (mut connected, _) = connect(addr, "staying-dev", Properties::default()).await;
    let mut late = RawClient::open_as(addr, ProtocolVersion::V5).await;
    assert!(eventually(PROMPTLY, || gw.metric("weir_connections_opened_total") == 2).await);

    let shutdown = tokio::spawn(gw.gateway.shutdown());
    // The connected device is told the server is going away.
    connected.expect_disconnect(ReasonCode::ServerShuttingDown).await;
    // By now the idle connection has seen the signal too.
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The one that had not sent CONNECT yet is answered server busy, not left hanging.
    late.send(&Packet::ConnectV5(Box::new(connect_v5("late-dev", 60, Properties::default())))).await;
    match late.recv_within(PROMPTLY).await {
        Ok(Some(Packet::ConnAckV5(connack))) => assert_eq!(connack.reason, ReasonCode::ServerBusy),
        other => panic!("expected CONNACK 0x89, got {other:?}"),
    }
    assert_eq!(late.recv_within(PROMPTLY).await, Ok(None));
    let report = tokio::time::timeout(Duration::from_secs(15), shutdown).await.unwrap().unwrap();
    assert!(report.clean);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_newest_is_answered_quota_exceeded() {
    let gw = TestGateway::start(
        "[fabric]\nshards = 1\nmax_records = 3\nbatch_max_records = 3\nlinger_ms = 1\nwhen_full = \"drop_newest\"\n",
    )
    .await;
    let db = gw.db_path();
    let lock = WriteLock::take(&db);
    let (mut client, _) = connect(gw.mqtt_addr(), "drop5-dev", Properties::default()).await;
    for pkid in 1..=5u16 {
        let payload = reading("drop5-dev", pkid.into());
        client.send(&publish_v5(QoS::AtLeastOnce, pkid, "t", payload, Properties::default())).await;
    }
    assert!(eventually(PROMPTLY, || gw.metric("weir_records_dropped_total") == 2).await);
    lock.release();
    let mut answers = Vec::new();
    for _ in 1..=5 {
        match client.recv_within(Duration::from_secs(10)).await {
            Ok(Some(Packet::PubAckV5(ack))) => answers.push((ack.pkid, ack.reason)),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    // Unlike 3.1.1, an MQTT 5 device learns that its message was dropped.
    let expected = [
        (1, ReasonCode::Success),
        (2, ReasonCode::Success),
        (3, ReasonCode::Success),
        (4, ReasonCode::QuotaExceeded),
        (5, ReasonCode::QuotaExceeded),
    ];
    assert_eq!(answers, expected);
    assert_eq!(rows(&db).iter().map(|r| r.1).collect::<Vec<_>>(), [1, 2, 3]);
    gw.gateway.shutdown().await;
}
