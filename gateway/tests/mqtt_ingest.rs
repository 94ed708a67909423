//! MQTT 3.1.1 devices publishing into the embedded SQLite sink, with real clients: rumqttc and
//! the stock `mosquitto_pub`.

mod common;

use std::time::Duration;

use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet as RPacket, QoS as RQoS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_publishes_qos_0_1_2_and_rows_arrive() {
    let gw = TestGateway::start("").await;
    let addr = gw.mqtt_addr();
    let mut options = MqttOptions::new("rumqttc-dev", addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let per_qos = 50u64;
    let publisher = tokio::spawn(async move {
        for (i, qos) in [RQoS::AtMostOnce, RQoS::AtLeastOnce, RQoS::ExactlyOnce].into_iter().enumerate() {
            for n in 0..per_qos {
                let seq = i as u64 * per_qos + n;
                client
                    .publish("devices/rumqttc-dev/telemetry", qos, false, reading("rumqttc-dev", seq))
                    .await
                    .unwrap();
            }
        }
        client
    });
    let (mut pubacks, mut pubcomps) = (0, 0);
    tokio::time::timeout(Duration::from_secs(30), async {
        while pubacks < per_qos || pubcomps < per_qos {
            match eventloop.poll().await.unwrap() {
                Event::Incoming(RPacket::PubAck(_)) => pubacks += 1,
                Event::Incoming(RPacket::PubComp(_)) => pubcomps += 1,
                _ => {}
            }
        }
    })
    .await
    .expect("all QoS 1 and 2 messages acknowledged");
    let _client = publisher.await.unwrap();

    // QoS 1 and 2 rows are in the table already: their acks came after the commit.
    let db = gw.db_path();
    let acked = count(&db, "SELECT count(*) FROM telemetry WHERE seq >= 50");
    assert_eq!(acked, 100);
    // QoS 0 has no ack; its rows arrive with the same batches.
    assert!(eventually(Duration::from_secs(10), || rows(&db).len() == 150).await, "{:?}", rows(&db).len());
    let expected: Vec<_> = (0..150).map(|s| ("rumqttc-dev".to_string(), s)).collect();
    assert_eq!(rows(&db), expected);
    let temp: f64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT json_extract(metrics, '$.temp') FROM telemetry LIMIT 1", [], |r| r.get(0))
        .unwrap();
    assert_eq!(temp, 21.5);
    assert_eq!(gw.metric("weir_records_committed_total"), 150);
    gw.gateway.shutdown().await;
}

fn mosquitto_pub(addr: std::net::SocketAddr, args: &[&str]) -> std::process::Output {
    std::process::Command::new("mosquitto_pub")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string(), "-V", "mqttv311"])
        .args(args)
        .output()
        .expect("mosquitto_pub must be installed (deploy/local/install-deps.sh installs mosquitto-clients)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_mosquitto_pub_at_each_qos() {
    let gw = TestGateway::start("").await;
    let addr = gw.mqtt_addr();
    for qos in ["0", "1", "2"] {
        let payload = format!(r#"{{"seq":{qos},"temp":2{qos}.5}}"#);
        let out = tokio::task::spawn_blocking(move || {
            mosquitto_pub(
                addr,
                &["-q", qos, "-i", "mosq-dev", "-t", "devices/mosq-dev/telemetry", "-m", &payload],
            )
        })
        .await
        .unwrap();
        assert!(out.status.success(), "mosquitto_pub -q {qos}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // mosquitto_pub exits after its QoS 1/2 handshake, which weir completes only after the
    // commit; QoS 0 may still be in its batch.
    let db = gw.db_path();
    assert!(eventually(Duration::from_secs(10), || rows(&db).len() == 3).await);
    assert_eq!(rows(&db), [("mosq-dev".into(), 0), ("mosq-dev".into(), 1), ("mosq-dev".into(), 2)]);
    let source: String = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT source FROM telemetry WHERE seq = 2", [], |r| r.get(0))
        .unwrap();
    assert_eq!(source, "devices/mosq-dev/telemetry");
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_payload_is_dead_lettered_and_acked() {
    let gw = TestGateway::start("").await;
    let mut client = RawClient::connect(gw.mqtt_addr(), "dl-dev").await;
    client
        .send(&publish(weir_protocols::mqtt::QoS::AtLeastOnce, 9, "devices/dl-dev/x", "temp=21".into()))
        .await;
    assert_eq!(client.recv().await, Some(weir_protocols::mqtt::Packet::PubAck(9)));
    let db = gw.db_path();
    let conn = rusqlite::Connection::open(&db).unwrap();
    let (device, source, error, raw): (String, String, String, Vec<u8>) = conn
        .query_row("SELECT device_id, source, error, raw FROM dead_letter", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .unwrap();
    assert_eq!(
        (device.as_str(), source.as_str(), raw.as_slice()),
        ("dl-dev", "devices/dl-dev/x", &b"temp=21"[..])
    );
    assert!(error.contains("not JSON"), "{error}");
    assert_eq!(gw.metric("weir_records_dead_lettered_total"), 1);
    assert_eq!(count(&db, "SELECT count(*) FROM telemetry"), 0);
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_messages_are_stored_once() {
    let gw = TestGateway::start("").await;
    let mut client = RawClient::connect(gw.mqtt_addr(), "dup-dev").await;
    for pkid in 1..=3 {
        client.send(&publish(weir_protocols::mqtt::QoS::AtLeastOnce, pkid, "t", reading("dup-dev", 7))).await;
        assert_eq!(client.recv().await, Some(weir_protocols::mqtt::Packet::PubAck(pkid)));
    }
    assert_eq!(rows(&gw.db_path()), [("dup-dev".into(), 7)]);
    assert_eq!(gw.metric("weir_records_duplicate_total"), 2);
    gw.gateway.shutdown().await;
}
