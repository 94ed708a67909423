//! MQTT persistent sessions through gateway restarts: a device with a persistent session (3.1.1
//! Clean Session 0, MQTT 5 Session Expiry > 0) gets Session Present = 1 from a new gateway on
//! the same data_dir and resends what was not acknowledged, which is then stored exactly once;
//! Clean Session ends a session, expiry removes it, a full store refuses new ones, a second
//! connection with the same client id takes over, and a reconnect storm shares transactions.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use weir_protocols::mqtt::{
    AckV5, ConnAck, ConnAckV5, Connect, ConnectReturnCode, ConnectV5, Packet, Properties, Publish, PublishV5,
    QoS, ReasonCode,
};

/// Generous bound for anything that should happen "at once".
const PROMPTLY: Duration = Duration::from_secs(5);

/// A short grace period: a gateway whose sink is stalled gives up on its unacknowledged
/// messages quickly (as a crash would lose them).
const QUICK_STOP: &str = "[shutdown]\ngrace_ms = 300\n[fabric]\nlinger_ms = 1\n";

/// MQTT 5 CONNECT with Clean Start and a Session Expiry Interval; returns weir's CONNACK.
async fn connect_v5(
    addr: std::net::SocketAddr,
    client_id: &str,
    clean_start: bool,
    session_expiry: Option<u32>,
) -> (RawClient, ConnAckV5) {
    let connect = ConnectV5 {
        connect: connect(5, client_id, clean_start),
        properties: Properties { session_expiry_interval: session_expiry, ..Properties::default() },
        will_properties: Properties::default(),
    };
    RawClient::connect_v5(addr, connect).await
}

/// MQTT 3.1.1 CONNECT with Clean Session; returns weir's CONNACK.
async fn connect_v311(
    addr: std::net::SocketAddr,
    client_id: &str,
    clean_session: bool,
) -> (RawClient, ConnAck) {
    RawClient::connect_v311(addr, connect(4, client_id, clean_session)).await
}

fn connect(protocol_level: u8, client_id: &str, clean_session: bool) -> Connect {
    Connect {
        protocol_level,
        clean_session,
        keep_alive_secs: 60,
        client_id: client_id.into(),
        will: None,
        username: None,
        password: None,
    }
}

fn publish_v5(qos: QoS, pkid: u16, payload: String, dup: bool) -> Packet {
    Packet::PublishV5(PublishV5 {
        publish: Publish { dup, qos, retain: false, topic: "t".into(), pkid, payload: Bytes::from(payload) },
        properties: Properties::default(),
    })
}

fn seqs(db: &std::path::Path, device: &str) -> Vec<i64> {
    rows(db).into_iter().filter(|(d, _)| d == device).map(|(_, seq)| seq).collect()
}

/// Stops the gateway and starts a new one on the same data_dir (and `extra_toml`).
async fn restart(gw: TestGateway, extra_toml: &str) -> (TestGateway, weir::ShutdownReport) {
    let TestGateway { gateway, dir } = gw;
    let report = gateway.shutdown().await;
    (TestGateway::start_in(dir, extra_toml).await, report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_session_survives_a_restart_and_unacknowledged_messages_are_stored_once() {
    const DEVICE: &str = "persist-5";
    let gw = TestGateway::start(QUICK_STOP).await;
    let db = gw.db_path();
    let (mut client, connack) = connect_v5(gw.mqtt_addr(), DEVICE, false, Some(3600)).await;
    assert_eq!((connack.reason, connack.session_present), (ReasonCode::Success, false));
    assert_eq!(connack.properties.session_expiry_interval, None, "granted as asked: not repeated");

    // A QoS 2 message stored and PUBREC'd before the restart; its PUBREL comes after it.
    client.send(&publish_v5(QoS::ExactlyOnce, 10, reading(DEVICE, 10), false)).await;
    assert_eq!(client.recv_within(PROMPTLY).await, Ok(Some(Packet::PubRecV5(AckV5::success(10)))));

    // QoS 1 and 2 messages the stalled sink cannot commit: never acknowledged.
    let lock = WriteLock::take(&db);
    for seq in 1..=4u16 {
        client.send(&publish_v5(QoS::AtLeastOnce, seq, reading(DEVICE, seq.into()), false)).await;
    }
    client.send(&publish_v5(QoS::ExactlyOnce, 5, reading(DEVICE, 5), false)).await;
    assert!(eventually(PROMPTLY, || gw.metric("weir_records_enqueued_total") == 6).await);
    assert_eq!(client.recv_within(Duration::from_millis(200)).await, Err(()), "nothing acknowledged");
    assert_eq!(gw.metric("weir_mqtt_sessions"), 1);

    // The gateway stops with them unacknowledged: its grace period runs out.
    let (gw, report) = restart(gw, QUICK_STOP).await;
    assert!(!report.clean, "the stalled messages were abandoned");
    lock.release();
    // The old connection is gone (told DISCONNECT 0x80 "resend it" if the abandoned messages
    // failed while it still ran).
    let goodbye = tokio::time::timeout(PROMPTLY, async {
        while let Some(packet) = client.recv().await {
            assert!(matches!(packet, Packet::DisconnectV5(_)), "{packet:?}");
        }
    });
    goodbye.await.expect("the old connection is closed");
    assert_eq!(gw.metric("weir_mqtt_sessions"), 1, "the session is in sessions.db");

    let (mut client, connack) = connect_v5(gw.mqtt_addr(), DEVICE, false, Some(3600)).await;
    assert_eq!(connack.reason, ReasonCode::Success);
    assert!(connack.session_present, "Session Present = 1 after the restart");
    assert_eq!(gw.metric("weir_mqtt_sessions_resumed_total"), 1);

    // The device completes the QoS 2 exchange of before: the new process never saw its id, and
    // completes it (its PUBREC was sent after the commit).
    client.send(&Packet::PubRelV5(AckV5::success(10))).await;
    assert_eq!(client.recv_within(PROMPTLY).await, Ok(Some(Packet::PubCompV5(AckV5::success(10)))));
    // It resends what was never acknowledged (DUP set), and is acknowledged in order.
    for seq in 1..=4u16 {
        client.send(&publish_v5(QoS::AtLeastOnce, seq, reading(DEVICE, seq.into()), true)).await;
    }
    client.send(&publish_v5(QoS::ExactlyOnce, 5, reading(DEVICE, 5), true)).await;
    for seq in 1..=4u16 {
        assert_eq!(client.recv_within(PROMPTLY).await, Ok(Some(Packet::PubAckV5(AckV5::success(seq)))));
    }
    assert_eq!(client.recv_within(PROMPTLY).await, Ok(Some(Packet::PubRecV5(AckV5::success(5)))));
    client.send(&Packet::PubRelV5(AckV5::success(5))).await;
    assert_eq!(client.recv_within(PROMPTLY).await, Ok(Some(Packet::PubCompV5(AckV5::success(5)))));

    assert_eq!(seqs(&db, DEVICE), [1, 2, 3, 4, 5, 10], "every message stored exactly once");
    client.disconnect(None).await;
    assert_eq!(gw.metric("weir_protocol_errors_total"), 0);
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_v5_resends_its_unacknowledged_messages_to_the_restarted_gateway() {
    use rumqttc::v5::mqttbytes::v5::Packet as RPacket;
    use rumqttc::v5::mqttbytes::QoS as RQoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    const DEVICE: &str = "rumq-persist";
    const MESSAGES: u64 = 5;

    let gw = TestGateway::start(QUICK_STOP).await;
    let addr = gw.mqtt_addr();
    let db = gw.db_path();
    let mut options = MqttOptions::new(DEVICE, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(5));
    options.set_clean_start(false);
    options.set_session_expiry_interval(Some(3600));
    let (client, mut eventloop) = AsyncClient::new(options, 64);

    let lock = WriteLock::take(&db);
    for seq in 1..=MESSAGES {
        client.publish("t", RQoS::AtLeastOnce, false, reading(DEVICE, seq)).await.unwrap();
    }
    // Connected, and every message written (rumqttc reports a publish once flushed); the event
    // loop is then left alone until the restart.
    let mut connacks = Vec::new();
    let mut written = 0;
    tokio::time::timeout(PROMPTLY, async {
        while written < MESSAGES {
            match eventloop.poll().await.expect("connected") {
                Event::Incoming(RPacket::ConnAck(connack)) => connacks.push(connack.session_present),
                Event::Outgoing(rumqttc::Outgoing::Publish(_)) => written += 1,
                _ => {}
            }
        }
    })
    .await
    .expect("the messages are sent");
    assert_eq!(connacks, [false]);
    assert!(eventually(PROMPTLY, || gw.metric("weir_records_enqueued_total") == MESSAGES).await);
    assert_eq!(gw.metric("weir_records_committed_total"), 0, "none acknowledged");

    // Restart on the same port and data_dir, the messages unacknowledged.
    let listen = format!("[[listeners]]\nprotocol = \"mqtt\"\nlisten = \"{addr}\"\n{QUICK_STOP}");
    let (gw, _) = restart(gw, &listen).await;
    lock.release();

    // rumqttc reconnects; told the session is present, it resends (with Session Present = 0 it
    // would drop them: an MQTT 5 client discards its session state).
    let mut pubacks = 0;
    tokio::time::timeout(Duration::from_secs(20), async {
        while pubacks < MESSAGES {
            match eventloop.poll().await {
                Ok(Event::Incoming(RPacket::ConnAck(connack))) => connacks.push(connack.session_present),
                Ok(Event::Incoming(RPacket::PubAck(_))) => pubacks += 1,
                Ok(_) => {}
                // The old gateway went away; the new one may not be listening yet.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .expect("every message acknowledged by the new gateway");
    assert_eq!(connacks, [false, true], "resumed after the restart");
    assert_eq!(seqs(&db, DEVICE), (1..=MESSAGES as i64).collect::<Vec<_>>(), "each stored once");
    assert_eq!(gw.metric("weir_mqtt_sessions_resumed_total"), 1);
    drop(client);
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_clean_session_0_is_present_after_a_restart_and_clean_session_1_ends_it() {
    const DEVICE: &str = "persist-311";
    let gw = TestGateway::start("").await;
    let db = gw.db_path();
    let (mut client, connack) = connect_v311(gw.mqtt_addr(), DEVICE, false).await;
    assert_eq!(connack, ConnAck { session_present: false, code: ConnectReturnCode::Accepted });
    // A QoS 2 message stored; the device leaves before releasing it.
    client.send(&publish(QoS::ExactlyOnce, 7, "t", reading(DEVICE, 7))).await;
    assert_eq!(client.recv_within(PROMPTLY).await, Ok(Some(Packet::PubRec(7))));
    client.disconnect(None).await;

    let (gw, report) = restart(gw, "").await;
    assert!(report.clean);
    let (mut client, connack) = connect_v311(gw.mqtt_addr(), DEVICE, false).await;
    assert_eq!(connack, ConnAck { session_present: true, code: ConnectReturnCode::Accepted });
    client.send(&Packet::PubRel(7)).await;
    assert_eq!(client.recv_within(PROMPTLY).await, Ok(Some(Packet::PubComp(7))));
    client.disconnect(None).await;

    // Clean Session 1 discards the session: the next persistent connect finds none.
    let (client, connack) = connect_v311(gw.mqtt_addr(), DEVICE, true).await;
    assert_eq!(connack, ConnAck { session_present: false, code: ConnectReturnCode::Accepted });
    assert_eq!(gw.metric("weir_mqtt_sessions"), 0);
    client.disconnect(None).await;
    let (client, connack) = connect_v311(gw.mqtt_addr(), DEVICE, false).await;
    assert!(!connack.session_present);
    client.disconnect(None).await;

    assert_eq!(seqs(&db, DEVICE), [7]);
    assert_eq!(gw.metric("weir_mqtt_sessions_resumed_total"), 1);
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_sessions_are_swept_and_counted() {
    let gw = TestGateway::start("[sessions]\nsweep_interval_ms = 50\n").await;
    let addr = gw.mqtt_addr();
    // Expiring 1 s after the disconnect, as the CONNECT asked.
    let (client, _) = connect_v5(addr, "short-a", false, Some(1)).await;
    client.disconnect(None).await;
    // Asked an hour; the DISCONNECT shortens it to 1 s.
    let (client, _) = connect_v5(addr, "short-b", false, Some(3600)).await;
    client.disconnect(Some(1)).await;
    // An hour, untouched.
    let (client, _) = connect_v5(addr, "long", false, Some(3600)).await;
    client.disconnect(None).await;

    assert!(
        eventually(PROMPTLY, || gw.metric("weir_mqtt_sessions_expired_total") == 2).await,
        "the two short sessions expire"
    );
    assert!(eventually(PROMPTLY, || gw.metric("weir_mqtt_sessions") == 1).await, "the long one stays");
    let (client, connack) = connect_v5(addr, "short-a", false, Some(1)).await;
    assert!(!connack.session_present, "an expired session is gone");
    client.disconnect(Some(0)).await;
    let (client, connack) = connect_v5(addr, "long", false, Some(3600)).await;
    assert!(connack.session_present);
    client.disconnect(None).await;
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_is_not_resumed_even_before_the_sweep_nor_after_a_restart() {
    let gw = TestGateway::start("").await;
    let (client, _) = connect_v5(gw.mqtt_addr(), "short", false, Some(1)).await;
    client.disconnect(None).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (client, connack) = connect_v5(gw.mqtt_addr(), "short", false, Some(1)).await;
    assert!(!connack.session_present);
    assert_eq!(gw.metric("weir_mqtt_sessions_expired_total"), 1, "found expired at CONNECT");
    client.disconnect(None).await;

    // Expired while weir was down: removed at startup.
    let TestGateway { gateway, dir } = gw;
    gateway.shutdown().await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let gw = TestGateway::start_in(dir, "").await;
    assert_eq!(gw.metric("weir_mqtt_sessions_expired_total"), 1, "removed at startup");
    assert_eq!(gw.metric("weir_mqtt_sessions"), 0);
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_connack_tells_the_capped_session_expiry() {
    let gw = TestGateway::start("[sessions]\nmax_expiry_s = 600\n").await;
    let (client, connack) = connect_v5(gw.mqtt_addr(), "forever", false, Some(u32::MAX)).await;
    assert_eq!(connack.properties.session_expiry_interval, Some(600));
    client.disconnect(None).await;
    // Clean Start 1 with no expiry: a session that ends with the connection, nothing to say.
    let (client, connack) = connect_v5(gw.mqtt_addr(), "forever", true, None).await;
    assert_eq!((connack.session_present, connack.properties.session_expiry_interval), (false, None));
    client.disconnect(None).await;
    assert_eq!(gw.metric("weir_mqtt_sessions"), 0, "Clean Start discarded it");
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_sessions_new_persistent_sessions_are_refused() {
    let gw = TestGateway::start("[sessions]\nmax_sessions = 1\n").await;
    let addr = gw.mqtt_addr();
    let (first, connack) = connect_v5(addr, "first", false, Some(60)).await;
    assert_eq!(connack.reason, ReasonCode::Success);

    let (mut second, connack) = connect_v5(addr, "second", false, Some(60)).await;
    assert_eq!((connack.reason, connack.session_present), (ReasonCode::QuotaExceeded, false));
    assert!(connack.properties.reason_string.is_some());
    assert_eq!(second.recv_within(PROMPTLY).await, Ok(None), "closed after the refusal");
    let (mut third, connack) = connect_v311(addr, "third", false).await;
    assert_eq!(connack.code, ConnectReturnCode::ServerUnavailable);
    assert_eq!(third.recv_within(PROMPTLY).await, Ok(None));

    // Clean sessions take no room; the stored one resumes.
    let (clean, connack) = connect_v311(addr, "third", true).await;
    assert_eq!(connack.code, ConnectReturnCode::Accepted);
    clean.disconnect(None).await;
    first.disconnect(None).await;
    let (first, connack) = connect_v5(addr, "first", false, Some(60)).await;
    assert!(connack.session_present);
    first.disconnect(None).await;

    let text = gw.gateway.metrics().encode();
    assert!(text.contains("weir_mqtt_sessions_refused_total{reason=\"max_sessions\"} 2"), "{text}");
    assert_eq!(gw.metric("weir_protocol_errors_total"), 0, "a refusal is not the device's error");
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_with_the_same_client_id_takes_over() {
    let gw = TestGateway::start("[fabric]\nlinger_ms = 1\n").await;
    let addr = gw.mqtt_addr();
    let (mut old, _) = connect_v5(addr, "twin", false, Some(60)).await;
    let (mut new, connack) = connect_v5(addr, "twin", false, Some(60)).await;
    assert!(connack.session_present, "the session is in use, hence present");
    match old.recv_within(PROMPTLY).await {
        Ok(Some(Packet::DisconnectV5(d))) => assert_eq!(d.reason, ReasonCode::SessionTakenOver),
        other => panic!("expected DISCONNECT 0x8E, got {other:?}"),
    }
    assert_eq!(old.recv_within(PROMPTLY).await, Ok(None));
    new.send(&publish_v5(QoS::AtLeastOnce, 1, reading("twin", 1), false)).await;
    assert_eq!(new.recv_within(PROMPTLY).await, Ok(Some(Packet::PubAckV5(AckV5::success(1)))));
    new.disconnect(None).await;
    // The old connection's end did not end the new one's session.
    let (new, connack) = connect_v5(addr, "twin", false, Some(60)).await;
    assert!(connack.session_present);
    new.disconnect(None).await;

    // 3.1.1 has no server DISCONNECT: the old connection is closed.
    let (mut old, _) = connect_v311(addr, "twin-311", true).await;
    let (new, _) = connect_v311(addr, "twin-311", true).await;
    assert_eq!(old.recv_within(PROMPTLY).await, Ok(None));
    new.disconnect(None).await;

    assert_eq!(gw.metric("weir_mqtt_sessions_taken_over_total"), 2);
    // Counted as the connection task ends, just after the device saw the close.
    let closed = "weir_connections_closed_total{protocol=\"mqtt\",reason=\"taken_over\"} 2";
    assert!(
        eventually(PROMPTLY, || gw.gateway.metrics().encode().contains(closed)).await,
        "{}",
        gw.gateway.metrics().encode()
    );
    assert_eq!(gw.metric("weir_protocol_errors_total"), 0);
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_shares_session_transactions() {
    const DEVICES: usize = 200;
    let gw = TestGateway::start("").await;
    let addr = gw.mqtt_addr();
    // Another process holds sessions.db's write lock, as a slow disk would hold the writer: every
    // CONNECT is queued before the first transaction can commit.
    let lock = WriteLock::take(&gw.dir.path().join("sessions.db"));
    let connects: Vec<_> = (0..DEVICES)
        .map(|n| {
            tokio::spawn(async move {
                let (client, connack) = connect_v5(addr, &format!("storm-{n}"), false, Some(600)).await;
                assert_eq!(connack.reason, ReasonCode::Success);
                client
            })
        })
        .collect();
    assert!(
        eventually(PROMPTLY, || gw.metric("weir_mqtt_session_store_pending") == DEVICES as u64).await,
        "every CONNECT waits for the store"
    );
    assert_eq!(gw.metric("weir_mqtt_session_store_transactions_total"), 0);
    lock.release();
    let mut clients = Vec::new();
    for connect in connects {
        clients.push(connect.await.unwrap());
    }
    let transactions = gw.metric("weir_mqtt_session_store_transactions_total");
    assert_eq!(gw.metric("weir_mqtt_session_store_requests_total"), DEVICES as u64);
    assert!(transactions < DEVICES as u64, "{transactions} transactions for {DEVICES} connects");
    assert_eq!(gw.metric("weir_mqtt_sessions"), DEVICES as u64);
    drop(clients);
    gw.gateway.shutdown().await;
}

fn mosquitto_pub(addr: std::net::SocketAddr, args: &[&str]) -> std::process::Output {
    std::process::Command::new("mosquitto_pub")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(args)
        .output()
        .expect("mosquitto_pub must be installed (deploy/local/install-deps.sh installs mosquitto-clients)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_mosquitto_pub_v5_resumes_its_session_after_a_restart() {
    const DEVICE: &str = "mosq-persist";
    let gw = TestGateway::start("").await;
    let db = gw.db_path();
    let send = |addr: std::net::SocketAddr, seq: u64| {
        let payload = reading(DEVICE, seq);
        tokio::task::spawn_blocking(move || {
            let args =
                ["-V", "mqttv5", "-c", "-i", DEVICE, "-x", "3600", "-q", "1", "-t", "t", "-m", &payload];
            let out = mosquitto_pub(addr, &args);
            assert!(out.status.success(), "mosquitto_pub: {}", String::from_utf8_lossy(&out.stderr));
        })
    };
    send(gw.mqtt_addr(), 1).await.unwrap();
    assert_eq!(gw.metric("weir_mqtt_sessions"), 1, "-c -x 3600 is a persistent session");
    assert_eq!(gw.metric("weir_mqtt_sessions_resumed_total"), 0);

    let (gw, _) = restart(gw, "").await;
    send(gw.mqtt_addr(), 2).await.unwrap();
    assert_eq!(gw.metric("weir_mqtt_sessions_resumed_total"), 1, "Session Present = 1 after the restart");
    assert_eq!(seqs(&db, DEVICE), [1, 2]);
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_sessions_0_keeps_no_session() {
    let gw = TestGateway::start("[sessions]\nmax_sessions = 0\n").await;
    let (client, connack) = connect_v5(gw.mqtt_addr(), "nobody", false, Some(3600)).await;
    assert_eq!(connack.properties.session_expiry_interval, Some(0), "told none is kept");
    client.disconnect(None).await;
    let (client, connack) = connect_v311(gw.mqtt_addr(), "nobody-311", false).await;
    assert_eq!(connack, ConnAck { session_present: false, code: ConnectReturnCode::Accepted });
    client.disconnect(None).await;
    let (client, connack) = connect_v5(gw.mqtt_addr(), "nobody", false, Some(3600)).await;
    assert!(!connack.session_present);
    client.disconnect(None).await;
    assert!(!gw.dir.path().join("sessions.db").exists());
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_too_slow_for_the_connect_deadline_is_told_server_unavailable() {
    let gw = TestGateway::start(
        "[[listeners]]\nprotocol = \"mqtt\"\nlisten = \"127.0.0.1:0\"\nconnect_timeout_ms = 300\n",
    )
    .await;
    let addr = gw.mqtt_addr();
    let lock = WriteLock::take(&gw.dir.path().join("sessions.db"));
    let (mut v5, connack) = connect_v5(addr, "slow-5", false, Some(60)).await;
    assert_eq!((connack.reason, connack.session_present), (ReasonCode::ServerUnavailable, false));
    assert_eq!(v5.recv_within(PROMPTLY).await, Ok(None));
    let (mut v311, connack) = connect_v311(addr, "slow-311", false).await;
    assert_eq!(connack.code, ConnectReturnCode::ServerUnavailable);
    assert_eq!(v311.recv_within(PROMPTLY).await, Ok(None));
    lock.release();

    // Not the devices' fault; and once the store catches up, it records those sessions as ended
    // (the late commit of their CONNECT is followed by their connection's end).
    let closed = "weir_connections_closed_total{protocol=\"mqtt\",reason=\"server_unavailable\"} 2";
    assert!(eventually(PROMPTLY, || gw.gateway.metrics().encode().contains(closed)).await);
    assert_eq!(gw.metric("weir_protocol_errors_total"), 0);
    assert!(eventually(PROMPTLY, || gw.metric("weir_mqtt_session_store_pending") == 0).await);
    let connected = count(
        &gw.dir.path().join("sessions.db"),
        "SELECT count(*) FROM mqtt_sessions WHERE disconnected_ms IS NULL",
    );
    assert_eq!(connected, 0, "no session left looking connected");
    let (client, connack) = connect_v5(addr, "slow-5", false, Some(60)).await;
    assert_eq!(connack.reason, ReasonCode::Success);
    client.disconnect(None).await;
    gw.gateway.shutdown().await;
}
