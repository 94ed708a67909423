//! Bad input from one device closes only that device's connection, with the answer MQTT 3.1.1
//! requires and a counted reason, while a healthy device on the same gateway keeps being acked.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::time::Instant;
use weir_protocols::mqtt::{
    ConnAck, Connect, ConnectReturnCode, Packet, QoS, SubAck, Subscribe, Unsubscribe,
};

/// Generous bound for anything that should happen "at once".
const PROMPTLY: Duration = Duration::from_secs(3);
const HEALTHY: &str = "healthy-dev";

/// One labelled sample of `name` in a Prometheus text exposition (0 when absent). `labels`
/// must be the sample's whole label set, in any order.
fn labelled_sample(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    let mut wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    wanted.sort();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let inner = series.strip_prefix(name)?.strip_prefix('{')?.strip_suffix('}')?;
            let mut found: Vec<&str> = inner.split(',').collect();
            found.sort_unstable();
            (found == wanted).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum::<f64>() as u64
}

/// Every `reason` of one `{protocol="mqtt",reason=...}` family, with its value.
fn by_reason(text: &str, name: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| {
            let reason = l.split("reason=\"").nth(1)?.split('"').next()?;
            let value = labelled_sample(text, name, &[("protocol", "mqtt"), ("reason", reason)]);
            Some((reason.to_owned(), value))
        })
        .collect()
}

/// Protocol errors and connection closes, by reason, at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reasons {
    errors: BTreeMap<String, u64>,
    closed: BTreeMap<String, u64>,
}

impl Reasons {
    fn read(gw: &TestGateway) -> Self {
        let text = gw.gateway.metrics().encode();
        Self {
            errors: by_reason(&text, "weir_protocol_errors_total"),
            closed: by_reason(&text, "weir_connections_closed_total"),
        }
    }

    /// What grew since `before`, leaving out reasons that did not change.
    fn since(&self, before: &Reasons) -> Reasons {
        let delta = |now: &BTreeMap<String, u64>, then: &BTreeMap<String, u64>| {
            now.iter()
                .map(|(k, v)| (k.clone(), v - then.get(k).copied().unwrap_or(0)))
                .filter(|(_, d)| *d > 0)
                .collect()
        };
        Reasons { errors: delta(&self.errors, &before.errors), closed: delta(&self.closed, &before.closed) }
    }
}

fn reasons(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

/// Asserts that exactly these protocol errors and closes were counted since `before`. The
/// close is counted just after the socket closes, so this waits for it briefly.
async fn assert_counted(
    gw: &TestGateway,
    before: &Reasons,
    errors: &[(&str, u64)],
    closed: &[(&str, u64)],
    case: &str,
) {
    let expected = Reasons { errors: reasons(errors), closed: reasons(closed) };
    eventually(PROMPTLY, || Reasons::read(gw).since(before) == expected).await;
    // Settle: nothing more than expected is counted a moment later either.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(Reasons::read(gw).since(before), expected, "{case}: counted reasons");
}

/// A device publishing QoS 1 readings one at a time in the background, each awaiting its
/// PUBACK, for the whole test.
struct HealthyDevice {
    acked: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl HealthyDevice {
    async fn start(gw: &TestGateway) -> Self {
        let mut client = RawClient::connect(gw.mqtt_addr(), HEALTHY).await;
        let acked = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (acked, stop) = (Arc::clone(&acked), Arc::clone(&stop));
            async move {
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let pkid = (seq % 65_535 + 1) as u16;
                    let topic = format!("devices/{HEALTHY}/t");
                    client.send(&publish(QoS::AtLeastOnce, pkid, &topic, reading(HEALTHY, seq))).await;
                    let answer = client.recv_within(Duration::from_secs(10)).await;
                    assert_eq!(answer, Ok(Some(Packet::PubAck(pkid))), "healthy message {seq} acked");
                    acked.store(seq, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                client.send(&Packet::Disconnect).await;
                assert!(client.closed_within(PROMPTLY).await, "healthy device leaves cleanly");
                seq
            }
        });
        Self { acked, stop, task }
    }

    /// Waits until two more messages are acked: the device still works after `case`.
    async fn still_acked(&self, case: &str) {
        let from = self.acked.load(Ordering::Relaxed);
        let moved =
            eventually(Duration::from_secs(10), || self.acked.load(Ordering::Relaxed) >= from + 2).await;
        assert!(!self.task.is_finished(), "healthy device failed around {case}");
        assert!(moved, "healthy device stalled around {case}");
    }

    /// Stops publishing and disconnects; returns how many messages were acked.
    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("healthy device task")
    }
}

fn connect_with(client_id: &str, clean_session: bool, keep_alive_secs: u16) -> Packet {
    Packet::Connect(Connect {
        protocol_level: 4,
        clean_session,
        keep_alive_secs,
        client_id: client_id.into(),
        will: None,
        username: None,
        password: None,
    })
}

fn connack(code: ConnectReturnCode) -> Option<Packet> {
    Some(Packet::ConnAck(ConnAck { session_present: false, code }))
}

/// A connected device sends `bytes`; weir answers nothing and closes, counting one malformed
/// packet.
async fn malformed_after_connect(gw: &TestGateway, case: &str, bytes: &[u8]) {
    let before = Reasons::read(gw);
    let mut client = RawClient::connect(gw.mqtt_addr(), "bad-dev").await;
    client.send_raw(bytes).await.unwrap();
    assert_eq!(client.recv_within(PROMPTLY).await, Ok(None), "{case}: closed without an answer");
    assert_counted(gw, &before, &[("malformed_packet", 1)], &[("protocol_error", 1)], case).await;
}

/// Fixed "random" bytes (xorshift64), so a failure replays.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_closes_only_its_own_connection() {
    let gw = TestGateway::start(
        "[[listeners]]\nprotocol = \"mqtt\"\nlisten = \"127.0.0.1:0\"\nconnect_timeout_ms = 300\n\
         [fabric]\nlinger_ms = 1\n",
    )
    .await;
    let addr = gw.mqtt_addr();
    let healthy = HealthyDevice::start(&gw).await;
    healthy.still_acked("start").await;

    // 1. A PUBLISH whose topic length field claims more than its remaining length holds.
    malformed_after_connect(
        &gw,
        "truncated publish",
        &[
            0x30, 0x04, // PUBLISH QoS 0, remaining length 4
            0x00, 0x09, b'a', b'b', // topic claims 9 bytes, 2 follow
        ],
    )
    .await;
    healthy.still_acked("truncated publish").await;

    // 2. A 256 MB remaining length is refused from the fixed header alone: no body is sent.
    let before = Reasons::read(&gw);
    let mut client = RawClient::connect(addr, "huge-dev").await;
    client
        .send_raw(&[
            0x30, // PUBLISH QoS 0
            0xFF, 0xFF, 0xFF, 0x7F, // remaining length 268,435,455
        ])
        .await
        .unwrap();
    assert_eq!(client.recv_within(PROMPTLY).await, Ok(None), "closed before any body");
    assert_counted(&gw, &before, &[("packet_too_large", 1)], &[("protocol_error", 1)], "huge length").await;
    healthy.still_acked("huge length").await;

    // 3. Invalid UTF-8 in a topic.
    malformed_after_connect(
        &gw,
        "invalid UTF-8 topic",
        &[
            0x30, 0x06, // PUBLISH QoS 0, remaining length 6
            0x00, 0x02, 0xC3, 0x28, // topic: an invalid 2-byte sequence
            b'h', b'i', // payload
        ],
    )
    .await;
    healthy.still_acked("invalid UTF-8 topic").await;

    // 4. Zero-length topic.
    malformed_after_connect(
        &gw,
        "zero-length topic",
        &[
            0x30, 0x03, // PUBLISH QoS 0, remaining length 3
            0x00, 0x00, // empty topic
            b'x', // payload
        ],
    )
    .await;
    healthy.still_acked("zero-length topic").await;

    // 5. QoS 1 without a packet id: no PUBACK, closed.
    malformed_after_connect(
        &gw,
        "QoS 1 without packet id",
        &[
            0x32, 0x03, // PUBLISH QoS 1, remaining length 3
            0x00, 0x01, b't', // topic "t", then nothing
        ],
    )
    .await;
    healthy.still_acked("QoS 1 without packet id").await;

    // 6. QoS 1 with packet id 0.
    malformed_after_connect(
        &gw,
        "packet id 0",
        &[
            0x32, 0x07, // PUBLISH QoS 1, remaining length 7
            0x00, 0x01, b't', // topic "t"
            0x00, 0x00, // packet id 0
            b'{', b'}', // payload
        ],
    )
    .await;
    healthy.still_acked("packet id 0").await;

    // 7. Garbage as the first bytes of a connection.
    for (case, bytes) in [
        // 'G' = 0x47: PUBACK with flags 0b0111.
        ("HTTP request", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        // First byte 0x0B: reserved packet type 0.
        ("64 random bytes", noise(64)),
    ] {
        let before = Reasons::read(&gw);
        let mut client = RawClient::open(addr).await;
        client.send_raw(&bytes).await.unwrap();
        assert_eq!(client.recv_within(PROMPTLY).await, Ok(None), "{case}: closed without an answer");
        assert_counted(&gw, &before, &[("malformed_packet", 1)], &[("protocol_error", 1)], case).await;
        healthy.still_acked(case).await;
    }

    // 8. Protocol level 7: CONNACK 0x01, then closed.
    let before = Reasons::read(&gw);
    let mut client = RawClient::open(addr).await;
    client
        .send_raw(&[
            0x10, 0x0E, // CONNECT, remaining length 14
            0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
            0x07, // protocol level 7
            0x02, // connect flags: clean session
            0x00, 0x3C, // keepalive 60 s
            0x00, 0x02, b'v', b'7', // client id "v7"
        ])
        .await
        .unwrap();
    assert_eq!(
        client.recv_within(PROMPTLY).await,
        Ok(connack(ConnectReturnCode::UnacceptableProtocolVersion))
    );
    assert_eq!(client.recv_within(PROMPTLY).await, Ok(None), "closed after CONNACK 0x01");
    assert_counted(&gw, &before, &[("unsupported_protocol_level", 1)], &[("protocol_error", 1)], "level 7")
        .await;
    healthy.still_acked("level 7").await;

    // 9. Empty client id with clean session 0: CONNACK 0x02, then closed.
    let before = Reasons::read(&gw);
    let mut client = RawClient::open(addr).await;
    client.send(&connect_with("", false, 60)).await;
    assert_eq!(client.recv_within(PROMPTLY).await, Ok(connack(ConnectReturnCode::IdentifierRejected)));
    assert_eq!(client.recv_within(PROMPTLY).await, Ok(None), "closed after CONNACK 0x02");
    assert_counted(&gw, &before, &[("client_id_rejected", 1)], &[("protocol_error", 1)], "empty client id")
        .await;
    healthy.still_acked("empty client id").await;

    // 10. A second CONNECT on a connected connection.
    let before = Reasons::read(&gw);
    let mut client = RawClient::connect(addr, "twice-dev").await;
    client.send(&connect_packet("twice-dev")).await;
    assert_eq!(client.recv_within(PROMPTLY).await, Ok(None), "closed on the second CONNECT");
    assert_counted(&gw, &before, &[("duplicate_connect", 1)], &[("protocol_error", 1)], "second CONNECT")
        .await;
    healthy.still_acked("second CONNECT").await;

    // 11. SUBSCRIBE is refused per filter and the connection stays usable; UNSUBSCRIBE is acked.
    let before = Reasons::read(&gw);
    let mut client = RawClient::connect(addr, "sub-dev").await;
    let filters = vec![("cmd/#".to_owned(), QoS::AtLeastOnce), ("cfg/+".to_owned(), QoS::AtMostOnce)];
    client.send(&Packet::Subscribe(Subscribe { pkid: 3, filters })).await;
    let refused = Packet::SubAck(SubAck { pkid: 3, return_codes: vec![SubAck::FAILURE, SubAck::FAILURE] });
    assert_eq!(client.recv_within(PROMPTLY).await, Ok(Some(refused)));
    client.send(&publish(QoS::AtLeastOnce, 4, "devices/sub-dev/t", reading("sub-dev", 1))).await;
    assert_eq!(client.recv_within(Duration::from_secs(10)).await, Ok(Some(Packet::PubAck(4))));
    client.send(&Packet::Unsubscribe(Unsubscribe { pkid: 5, filters: vec!["cmd/#".into()] })).await;
    assert_eq!(client.recv_within(PROMPTLY).await, Ok(Some(Packet::UnsubAck(5))));
    client.send(&Packet::Disconnect).await;
    assert!(client.closed_within(PROMPTLY).await);
    assert_counted(&gw, &before, &[], &[("disconnect", 1)], "subscribe").await;
    healthy.still_acked("subscribe").await;

    // 12. PINGREQ → PINGRESP.
    let before = Reasons::read(&gw);
    let mut client = RawClient::connect(addr, "ping-dev").await;
    client.send(&Packet::PingReq).await;
    assert_eq!(client.recv_within(PROMPTLY).await, Ok(Some(Packet::PingResp)));
    client.send(&Packet::Disconnect).await;
    assert!(client.closed_within(PROMPTLY).await);
    assert_counted(&gw, &before, &[], &[("disconnect", 1)], "ping").await;
    healthy.still_acked("ping").await;

    // 13a. Keepalive 1 s, then silence: closed after 1.5 s.
    let before = Reasons::read(&gw);
    let mut client = RawClient::open(addr).await;
    client.send(&connect_with("silent-dev", true, 1)).await;
    assert_eq!(client.recv_within(PROMPTLY).await, Ok(connack(ConnectReturnCode::Accepted)));
    let connected = Instant::now();
    assert_eq!(client.recv_within(Duration::from_secs(1)).await, Err(()), "still open after 1.0 s");
    assert_eq!(client.recv_within(Duration::from_secs(3)).await, Ok(None), "closed within 4 s");
    let lived = connected.elapsed();
    assert!(lived >= Duration::from_secs(1), "closed after {lived:?}");
    assert_counted(
        &gw,
        &before,
        &[("keepalive_timeout", 1)],
        &[("keepalive_timeout", 1)],
        "keepalive timeout",
    )
    .await;
    healthy.still_acked("keepalive timeout").await;

    // 13b. Keepalive 1 s with a PINGREQ every 0.7 s: still open after 3 s.
    let before = Reasons::read(&gw);
    let mut client = RawClient::open(addr).await;
    client.send(&connect_with("pinging-dev", true, 1)).await;
    assert_eq!(client.recv_within(PROMPTLY).await, Ok(connack(ConnectReturnCode::Accepted)));
    let connected = Instant::now();
    let mut pings =
        tokio::time::interval_at(connected + Duration::from_millis(700), Duration::from_millis(700));
    while connected.elapsed() < Duration::from_secs(3) {
        pings.tick().await;
        client.send(&Packet::PingReq).await;
        assert_eq!(
            client.recv_within(PROMPTLY).await,
            Ok(Some(Packet::PingResp)),
            "open after {:?}",
            connected.elapsed()
        );
    }
    client.send(&Packet::Disconnect).await;
    assert!(client.closed_within(PROMPTLY).await);
    assert_counted(&gw, &before, &[], &[("disconnect", 1)], "pinging keepalive").await;
    healthy.still_acked("pinging keepalive").await;

    // 14. A TCP connection that never sends CONNECT is closed at the 300 ms connect deadline.
    let before = Reasons::read(&gw);
    let opened = Instant::now();
    let mut client = RawClient::open(addr).await;
    assert_eq!(client.recv_within(PROMPTLY).await, Ok(None), "closed within 3 s");
    let lived = opened.elapsed();
    assert!(lived >= Duration::from_millis(250), "closed after {lived:?}, before its deadline");
    assert_counted(&gw, &before, &[("connect_timeout", 1)], &[("connect_timeout", 1)], "connect timeout")
        .await;
    healthy.still_acked("connect timeout").await;

    // 15. Half a PUBLISH, then the device goes away: a plain peer close, nothing stored.
    let before = Reasons::read(&gw);
    let mut client = RawClient::connect(addr, "half-dev").await;
    client
        .send_raw(&[
            0x32, 0x20, // PUBLISH QoS 1, remaining length 32
            0x00, 0x0A, b'd', b'e', b'v', // topic claims 10 bytes, 3 sent
        ])
        .await
        .unwrap();
    drop(client);
    assert_counted(&gw, &before, &[], &[("peer_closed", 1)], "half publish").await;
    healthy.still_acked("half publish").await;

    // Only the healthy device is still connected, and every message it was acked is stored.
    assert!(
        eventually(PROMPTLY, || gw.metric("weir_connections_active") == 1).await,
        "active connections: {}",
        gw.metric("weir_connections_active")
    );
    assert_eq!(
        gw.metric("weir_connections_opened_total"),
        gw.metric("weir_connections_closed_total") + 1,
        "every other connection was counted closed"
    );
    let sent = healthy.finish().await;
    assert!(eventually(PROMPTLY, || gw.metric("weir_connections_active") == 0).await);
    let stored: Vec<i64> =
        rows(&gw.db_path()).into_iter().filter(|(device, _)| device == HEALTHY).map(|(_, seq)| seq).collect();
    assert_eq!(stored, (1..=sent as i64).collect::<Vec<_>>(), "every healthy message stored once");
    assert_eq!(rows(&gw.db_path()).iter().filter(|(device, _)| device == "sub-dev").count(), 1);
    assert_eq!(rows(&gw.db_path()).len() as u64, sent + 1, "bad input stored nothing");
    gw.gateway.shutdown().await;
}
