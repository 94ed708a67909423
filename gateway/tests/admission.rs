//! Admission control at accept: a storm of connection attempts is held to the listener's rate
//! (the rest are told "server busy" or closed, none left hanging, no crash), and one source
//! address gets at most its share of connections.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use weir_protocols::mqtt::{
    encode, Connect, ConnectV5, Decoder, Packet, Properties, ProtocolVersion, QoS, ReasonCode,
};

/// What one connection attempt got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Answer {
    Accepted,
    Refused(ReasonCode),
    /// 3.1.1 CONNACK return code.
    RefusedV3(u8),
    /// Closed without a CONNACK.
    Closed,
    /// Neither answered nor closed within the wait: a hung socket.
    Hung,
    ConnectFailed,
}

fn connect_for(client_id: &str, version: ProtocolVersion) -> Packet {
    match (connect_packet(client_id), version) {
        (Packet::Connect(connect), ProtocolVersion::V5) => Packet::ConnectV5(Box::new(ConnectV5 {
            connect: Connect { protocol_level: 5, ..connect },
            properties: Properties::default(),
            will_properties: Properties::default(),
        })),
        (packet, _) => packet,
    }
}

/// Connects (from `source`, when given), sends CONNECT and waits up to `wait` for the answer.
/// Returns the answer and, when accepted, the open stream.
async fn attempt(
    addr: SocketAddr,
    source: Option<&str>,
    client_id: String,
    version: ProtocolVersion,
    wait: Duration,
) -> (Answer, Option<TcpStream>) {
    let connected = match source {
        Some(source) => {
            let socket = TcpSocket::new_v4().unwrap();
            socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
            socket.connect(addr).await
        }
        None => TcpStream::connect(addr).await,
    };
    let Ok(mut stream) = connected else { return (Answer::ConnectFailed, None) };
    let mut out = BytesMut::new();
    encode(&connect_for(&client_id, version), &mut out);
    if stream.write_all(&out).await.is_err() {
        return (Answer::Closed, None);
    }
    let decoder = Decoder::new(version, 1 << 20);
    let mut buf = BytesMut::new();
    let answer = tokio::time::timeout(wait, async {
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(Packet::ConnAckV5(c))) if c.reason == ReasonCode::Success => return Answer::Accepted,
                Ok(Some(Packet::ConnAckV5(c))) => return Answer::Refused(c.reason),
                Ok(Some(Packet::ConnAck(c))) if c.code as u8 == 0 => return Answer::Accepted,
                Ok(Some(Packet::ConnAck(c))) => return Answer::RefusedV3(c.code as u8),
                Ok(Some(_)) | Err(_) => return Answer::Closed,
                Ok(None) => {}
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return Answer::Closed,
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap_or(Answer::Hung);
    (answer, (answer == Answer::Accepted).then_some(stream))
}

fn listener(limits: &str) -> String {
    format!("[[listeners]]\nprotocol = \"mqtt\"\nlisten = \"127.0.0.1:0\"\n{limits}\n[sink]\nkind = \"blackhole\"\n")
}

/// 5,000 connection attempts within about a second against a listener admitting 200/s (burst
/// 200): about 400 are accepted, every other one is told "server busy" (0x89) or closed at
/// once; none hangs, weir stays up and accepts again once the storm is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_storm_is_held_to_the_admission_rate() {
    const ATTEMPTS: usize = 5_000;
    let gw = TestGateway::start(&listener(
        "max_connection_rate = 200\nconnection_burst = 200\nmax_connections_per_ip = 0",
    ))
    .await;
    let addr = gw.mqtt_addr();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..ATTEMPTS {
        // Spread over the loopback addresses: one source address has too few ports for a storm.
        let source = format!("127.0.{}.{}", 1 + i / 250, 1 + i % 250);
        tasks.spawn(async move {
            let answer = attempt(
                addr,
                Some(&source),
                format!("storm-{i}"),
                ProtocolVersion::V5,
                Duration::from_secs(10),
            )
            .await;
            let answered = started.elapsed();
            // Hold accepted connections until the storm is over, so each counts once.
            tokio::time::sleep(Duration::from_secs(3)).await;
            (answer.0, answered)
        });
        if i % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let sent_in = started.elapsed();
    let mut answers = std::collections::HashMap::new();
    // The last answer: weir kept accepting (and the bucket refilling) until then.
    let mut elapsed = Duration::ZERO;
    while let Some(joined) = tasks.join_next().await {
        let (answer, answered) = joined.unwrap();
        *answers.entry(answer).or_insert(0usize) += 1;
        elapsed = elapsed.max(answered);
    }
    let count = |a: Answer| answers.get(&a).copied().unwrap_or(0);
    let accepted = count(Answer::Accepted);
    let busy = count(Answer::Refused(ReasonCode::ServerBusy));
    let closed = count(Answer::Closed);
    println!(
        "storm: {ATTEMPTS} attempts sent in {sent_in:?}: accepted {accepted}, CONNACK 0x89 {busy}, closed {closed}, \
         hung {}, connect failed {} (all answered in {elapsed:?}); refused metric {}",
        count(Answer::Hung),
        count(Answer::ConnectFailed),
        gw.metric("weir_connections_refused_total")
    );
    assert_eq!(count(Answer::Hung), 0, "no socket left hanging: {answers:?}");
    assert_eq!(count(Answer::ConnectFailed), 0, "{answers:?}");
    assert_eq!(accepted + busy + closed, ATTEMPTS, "only these answers: {answers:?}");
    // The burst, plus the rate for as long as weir was accepting the storm.
    let allowed = 200 + (200.0 * elapsed.as_secs_f64()).ceil() as usize;
    assert!(accepted >= 200 && accepted <= allowed, "{accepted} accepted, at most {allowed} allowed");
    assert!(busy > 0, "refused devices are told why");
    assert_eq!(gw.metric("weir_connections_refused_total") as usize, busy + closed);
    // Afterwards the listener admits again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (answer, _) = attempt(addr, None, "after".into(), ProtocolVersion::V5, Duration::from_secs(5)).await;
    assert_eq!(answer, Answer::Accepted);
    gw.gateway.shutdown().await;
}

/// Over the rate, an MQTT 3.1.1 device gets return code 3 (server unavailable), then the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_311_device_over_the_rate_is_told_server_unavailable() {
    let gw = TestGateway::start(&listener("max_connection_rate = 1\nconnection_burst = 1")).await;
    let (first, _kept) =
        attempt(gw.mqtt_addr(), None, "a".into(), ProtocolVersion::V311, Duration::from_secs(5)).await;
    assert_eq!(first, Answer::Accepted);
    let (second, _) =
        attempt(gw.mqtt_addr(), None, "b".into(), ProtocolVersion::V311, Duration::from_secs(5)).await;
    assert_eq!(second, Answer::RefusedV3(3));
    gw.gateway.shutdown().await;
}

/// One source address holds at most `max_connections_per_ip`; the next is told "quota
/// exceeded" (0x97), another address is unaffected, and a closed connection frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_gets_at_most_its_share_of_connections() {
    let gw = TestGateway::start(&listener("max_connections_per_ip = 3")).await;
    let addr = gw.mqtt_addr();
    let wait = Duration::from_secs(5);
    let mut kept = Vec::new();
    for i in 0..3 {
        let (answer, stream) =
            attempt(addr, Some("127.0.0.2"), format!("ip-{i}"), ProtocolVersion::V5, wait).await;
        assert_eq!(answer, Answer::Accepted, "connection {i}");
        kept.push(stream);
    }
    let (fourth, _) = attempt(addr, Some("127.0.0.2"), "ip-3".into(), ProtocolVersion::V5, wait).await;
    assert_eq!(fourth, Answer::Refused(ReasonCode::QuotaExceeded));
    let (other, _other) = attempt(addr, Some("127.0.0.3"), "other".into(), ProtocolVersion::V5, wait).await;
    assert_eq!(other, Answer::Accepted, "another address is not affected");
    drop(kept.pop());
    let mut freed = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (answer, stream) =
            attempt(addr, Some("127.0.0.2"), "ip-again".into(), ProtocolVersion::V5, wait).await;
        if answer == Answer::Accepted {
            kept.push(stream);
            freed = true;
            break;
        }
    }
    assert!(freed, "a closed connection frees its address's place");
    assert!(gw.metric("weir_connections_refused_total") >= 1);
    gw.gateway.shutdown().await;
}

/// Slowloris: after CONNECT (keepalive 2 s), a device trickles one byte of a PUBLISH every
/// 300 ms and never completes it. Bytes are not packets: it is closed at 1.5 × its keepalive,
/// while a device that sends whole packets stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_trickling_bytes_is_closed_at_its_keepalive_deadline() {
    let gw = TestGateway::start(&listener("")).await;
    let connect = |id: &str| {
        let Packet::Connect(c) = connect_packet(id) else { unreachable!() };
        Packet::Connect(Connect { keep_alive_secs: 2, ..c })
    };
    let mut trickler = RawClient::open(gw.mqtt_addr()).await;
    trickler.send(&connect("trickler")).await;
    assert!(matches!(trickler.recv().await, Some(Packet::ConnAck(_))));
    let mut honest = RawClient::open(gw.mqtt_addr()).await;
    honest.send(&connect("honest")).await;
    assert!(matches!(honest.recv().await, Some(Packet::ConnAck(_))));

    let mut publish_bytes = BytesMut::new();
    encode(&publish(weir_protocols::mqtt::QoS::AtMostOnce, 0, "t", "x".repeat(200)), &mut publish_bytes);
    let started = Instant::now();
    let mut closed_after = None;
    for byte in publish_bytes.iter().take(40) {
        if trickler.send_raw(&[*byte]).await.is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        honest.send(&Packet::PingReq).await;
        assert_eq!(honest.recv().await, Some(Packet::PingResp), "a device sending whole packets stays");
        if trickler.closed_within(Duration::from_millis(300)).await {
            closed_after = Some(started.elapsed());
            break;
        }
    }
    let closed_after = closed_after.expect("the trickling device was closed");
    println!("trickling device closed after {closed_after:?} (keepalive 2 s)");
    assert!(closed_after >= Duration::from_millis(2_500), "not before 1.5 x keepalive: {closed_after:?}");
    assert!(closed_after <= Duration::from_secs(6), "{closed_after:?}");
    gw.gateway.shutdown().await;
}

/// A device over its message rate (`max_messages_per_s = 500`, a burst of one second's worth)
/// is slowed: it sends 1,500 QoS 1 messages at once and gets their PUBACKs no faster than its
/// rate lets it (every message stored, none dropped), while a quiet device on the same
/// listener is never held back: each of its messages is acknowledged promptly throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_device_is_slowed_while_others_keep_their_latency() {
    const FLOOD: u16 = 1_500;
    const RATE: u64 = 500;
    let gw = TestGateway::start(&listener(&format!("max_messages_per_s = {RATE}"))).await;
    let addr = gw.mqtt_addr();

    let quiet = tokio::spawn(async move {
        let mut device = RawClient::connect(addr, "quiet").await;
        let mut latencies = Vec::new();
        for seq in 1..=20u16 {
            let sent = Instant::now();
            device.send(&publish(QoS::AtLeastOnce, seq, "t/quiet", reading("quiet", seq.into()))).await;
            assert_eq!(device.recv().await, Some(Packet::PubAck(seq)), "quiet device's message {seq}");
            latencies.push(sent.elapsed());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        latencies
    });

    let mut flooder = RawClient::connect(addr, "flooder").await;
    let mut burst = BytesMut::new();
    for seq in 1..=FLOOD {
        encode(&publish(QoS::AtLeastOnce, seq, "t/flood", reading("flooder", seq.into())), &mut burst);
    }
    let started = Instant::now();
    flooder.send_raw(&burst).await.unwrap();
    for seq in 1..=FLOOD {
        assert_eq!(flooder.recv().await, Some(Packet::PubAck(seq)), "the flood's message {seq}");
    }
    let flood_took = started.elapsed();
    let latencies = quiet.await.unwrap();
    let worst = latencies.iter().max().copied().unwrap_or_default();
    println!(
        "flood of {FLOOD} at {RATE}/s acknowledged in {flood_took:?}; quiet device: worst {worst:?} of {} acks, \
         throttled {} times",
        latencies.len(),
        gw.metric("weir_throttled_total")
    );
    // The first 500 fit the burst; the other 1,000 come at 500 a second.
    let budget = Duration::from_millis(1_000 * (u64::from(FLOOD) - RATE) / RATE);
    assert!(flood_took >= budget - Duration::from_millis(50), "faster than its rate: {flood_took:?}");
    assert!(gw.metric("weir_throttled_total") > 0);
    // Relative, not a latency target: the quiet device's worst wait is a fraction of the time
    // the flood was held back.
    assert!(worst < flood_took / 4, "the quiet device waited {worst:?} (the flood took {flood_took:?})");
    assert_eq!(gw.metric("weir_messages_received_total"), u64::from(FLOOD) + 20);
    gw.gateway.shutdown().await;
}

/// Slowloris on raw TCP: a device trickles the bytes of a line and never ends it. Only whole
/// frames count as input, so it is closed at the idle deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_device_trickling_a_frame_is_closed_at_the_idle_deadline() {
    let gw = TestGateway::start(
        "[[listeners]]\nprotocol = \"tcp\"\nlisten = \"127.0.0.1:0\"\nframing = \"lines\"\nidle_timeout_ms = 1500\n\
         [sink]\nkind = \"blackhole\"\n",
    )
    .await;
    let mut stream = TcpStream::connect(gw.gateway.listener_addrs()[0]).await.unwrap();
    // A whole first frame (so the connect deadline is met), then a line that never ends.
    stream.write_all(format!("{}\n", reading("trickler", 1)).as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut closed_after = None;
    let mut scratch = [0u8; 256];
    for byte in reading("trickler", 2).bytes().cycle().take(40) {
        if stream.write_all(&[byte]).await.is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        // Replies (the first frame's ack) are read and dropped; EOF or reset means closed.
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(200), stream.read(&mut scratch)).await
        {
            closed_after = Some(started.elapsed());
            break;
        }
    }
    let closed_after = closed_after.expect("the trickling device was closed");
    println!("trickling TCP device closed after {closed_after:?} (idle timeout 1.5 s)");
    assert!(closed_after >= Duration::from_millis(1_300), "{closed_after:?}");
    assert!(closed_after <= Duration::from_secs(5), "{closed_after:?}");
    gw.gateway.shutdown().await;
}
