//! TLS and mutual TLS on every listener, with certificates made at test time (rcgen): MQTT
//! (weir's codec over a rustls client, and the stock `mosquitto_pub`), WebSocket and HTTP
//! ingest, raw TCP and the ops endpoints; revoked, expired, unknown and wildcard client
//! certificates; old protocol versions; the handshake deadline; and certificate reload.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::pki::{Client, Issued, Pki};
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use weir_protocols::mqtt::{decode, encode, Packet, ProtocolVersion, QoS};

/// `[listeners.tls]` (or `[ops.tls]` with `table = "ops.tls"`) for `server`, plus `extra` lines.
fn tls_table(table: &str, server: &Issued, extra: &str) -> String {
    format!("[{table}]\ncert_file = {:?}\nkey_file = {:?}\n{extra}\n", server.cert, server.key)
}

fn listener(protocol: &str, extra: &str) -> String {
    format!("[[listeners]]\nprotocol = \"{protocol}\"\nlisten = \"127.0.0.1:0\"\n{extra}\n")
}

/// mTLS settings: client certificates from `pki`'s CA, revoked per `crl`.
fn mtls(pki: &Pki, crl: Option<&Path>) -> String {
    let mut extra = format!("client_ca_file = {:?}\n", pki.ca_file());
    if let Some(crl) = crl {
        extra.push_str(&format!("crl_files = [{crl:?}]\n"));
    }
    extra
}

/// MQTT 3.1.1 CONNECT over `stream` (here: TLS); `Err` with what happened instead of a
/// successful CONNACK.
async fn mqtt_connect<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    client_id: &str,
) -> Result<RawClient<S>, String> {
    let mut mqtt = RawClient::over(stream, ProtocolVersion::V311);
    mqtt.try_send(&connect_packet(client_id)).await.map_err(|e| format!("write: {e}"))?;
    match answer(&mut mqtt).await {
        Some(Packet::ConnAck(ack)) if ack.code as u8 == 0 => Ok(mqtt),
        other => Err(format!("no CONNACK: {other:?}")),
    }
}

/// The next packet, or `None` when the connection ends (or fails) first.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mqtt: &mut RawClient<S>) -> Option<Packet> {
    mqtt.recv_within(Duration::from_secs(10)).await.expect("no answer from weir within 10 s")
}

/// Publishes a QoS 1 message and waits for its PUBACK (sent after the commit).
async fn publish_acked<S: AsyncRead + AsyncWrite + Unpin>(
    mqtt: &mut RawClient<S>,
    pkid: u16,
    payload: String,
) {
    mqtt.send(&publish(QoS::AtLeastOnce, pkid, "devices/tls/telemetry", payload)).await;
    assert_eq!(answer(mqtt).await, Some(Packet::PubAck(pkid)));
}

/// The handshake-failure count of `reason`.
fn handshake_failures(gw: &TestGateway, reason: &str) -> u64 {
    let text = gw.gateway.metrics().encode();
    let needle = format!("reason=\"{reason}\"");
    text.lines()
        .filter(|l| l.starts_with("weir_tls_handshake_failures_total{") && l.contains(&needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn device_ids(db: &Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn.prepare("SELECT DISTINCT device_id FROM telemetry ORDER BY device_id").unwrap();
    stmt.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
}

fn mosquitto_pub(addr: SocketAddr, args: &[&str]) -> std::process::Output {
    std::process::Command::new("mosquitto_pub")
        // The server certificate names localhost (and 127.0.0.1); mosquitto checks the name.
        .args(["-h", "localhost", "-p", &addr.port().to_string(), "-V", "mqttv311", "-q", "1"])
        .args(args)
        .output()
        .expect("mosquitto_pub must be installed (deploy/local/install-deps.sh installs mosquitto-clients)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_tls_with_a_rustls_client_and_mosquitto_pub() {
    let dir = tempfile::tempdir().unwrap();
    let mut pki = Pki::new(dir.path(), "plain");
    let server = pki.server("server", "weir");
    let gw =
        TestGateway::start(&format!("{}{}", listener("mqtt", ""), tls_table("listeners.tls", &server, "")))
            .await;
    let addr = gw.mqtt_addr();

    let client = Client::trusting(&pki.ca_der(), None);
    let mut mqtt = mqtt_connect(client.connect(addr).await.unwrap(), "tls-dev").await.unwrap();
    for seq in 1..=3 {
        publish_acked(&mut mqtt, seq as u16, reading("tls-dev", seq)).await;
    }
    // Without client certificates, records name their device (or the client id does).
    publish_acked(&mut mqtt, 4, r#"{"seq":4,"temp":1}"#.into()).await;

    let ca = pki.ca_file();
    let out = tokio::task::spawn_blocking(move || {
        let ca = ca.to_str().unwrap().to_owned();
        mosquitto_pub(
            addr,
            &["--cafile", &ca, "-i", "mosq-tls", "-t", "d/mosq-tls", "-m", r#"{"seq":1,"t":2}"#],
        )
    })
    .await
    .unwrap();
    assert!(out.status.success(), "mosquitto_pub failed: {}", String::from_utf8_lossy(&out.stderr));

    // A plain MQTT client on the TLS port gets nowhere, and is counted.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    let mut connect = BytesMut::new();
    encode(&connect_packet("plain"), &mut connect);
    plain.write_all(&connect).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await.unwrap().ok();
    // At most a TLS alert record (content type 21), never a CONNACK.
    assert!(answer.is_empty() || answer[0] == 21, "{answer:?}");

    let db = gw.db_path();
    assert!(eventually(Duration::from_secs(10), || rows(&db).len() == 5).await, "{:?}", rows(&db));
    assert_eq!(device_ids(&db), ["mosq-tls", "tls-dev"]);
    assert_eq!(gw.metric("weir_tls_handshakes_total"), 2);
    assert!(eventually(Duration::from_secs(5), || handshake_failures(&gw, "protocol_error") == 1).await);
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_and_pipelined_messages_cross_tls_record_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    let mut pki = Pki::new(dir.path(), "bulk");
    let server = pki.server("server", "weir");
    let gw =
        TestGateway::start(&format!("{}{}", listener("mqtt", ""), tls_table("listeners.tls", &server, "")))
            .await;
    let client = Client::trusting(&pki.ca_der(), None);
    let mut mqtt = mqtt_connect(client.connect(gw.mqtt_addr()).await.unwrap(), "bulk").await.unwrap();
    // One message of ~300 KB spans many TLS records.
    let big =
        format!(r#"{{"device_id":"bulk","seq":0,"tags":{{"blob":"{}"}},"temp":1}}"#, "x".repeat(300_000));
    publish_acked(&mut mqtt, 1, big).await;
    // 500 messages in one write: many packets per record, packets split across records.
    let mut out = BytesMut::new();
    for seq in 1..=500u16 {
        encode(&publish(QoS::AtLeastOnce, seq + 1, "d/bulk", reading("bulk", seq.into())), &mut out);
    }
    mqtt.stream.write_all(&out).await.unwrap();
    mqtt.stream.flush().await.unwrap();
    for seq in 1..=500u16 {
        assert_eq!(answer(&mut mqtt).await, Some(Packet::PubAck(seq + 1)));
    }
    assert_eq!(rows(&gw.db_path()).len(), 501);
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_identity_is_the_device_id_and_bad_client_certificates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut pki = Pki::new(dir.path(), "devices");
    let server = pki.server("server", "weir");
    let good = pki.client("good", "sensor-7");
    let revoked = pki.client("revoked", "sensor-8");
    let expired = pki.expired_client("expired", "sensor-9");
    let wildcard = pki.client("wildcard", "dev+1");
    let hash = pki.client("hash", "plant/#");
    let crl = pki.crl("devices", &[&revoked]);
    let mut stranger_ca = Pki::new(dir.path(), "stranger");
    let stranger = stranger_ca.client("stranger", "sensor-10");
    let gw = TestGateway::start(&format!(
        "{}{}",
        listener("mqtt", ""),
        tls_table("listeners.tls", &server, &mtls(&pki, Some(&crl)))
    ))
    .await;
    let addr = gw.mqtt_addr();
    let ca = pki.ca_der();

    // The good certificate connects; its CN is the device of records that name none.
    let client = Client::trusting(&ca, Some(&good));
    let mut mqtt = mqtt_connect(client.connect(addr).await.unwrap(), "any-client-id").await.unwrap();
    publish_acked(&mut mqtt, 1, r#"{"seq":1,"temp":20.5}"#.into()).await;
    publish_acked(&mut mqtt, 2, r#"{"seq":2,"temp":20.6}"#.into()).await;
    let db = gw.db_path();
    assert_eq!(rows(&db), [("sensor-7".to_string(), 1), ("sensor-7".to_string(), 2)]);

    // Each bad one fails (with TLS 1.3 the client sees it on its first read) and is counted.
    for (issued, reason) in [
        (None, "no_client_certificate"),
        (Some(&revoked), "certificate_revoked"),
        (Some(&expired), "certificate_expired"),
        (Some(&wildcard), "bad_identity"),
        (Some(&hash), "bad_identity"),
        (Some(&stranger), "unknown_issuer"),
    ] {
        for versions in [&[&rustls::version::TLS13][..], &[&rustls::version::TLS12][..]] {
            let before = handshake_failures(&gw, reason);
            let client = Client::new(&ca, issued, versions);
            if let Ok(stream) = client.connect(addr).await {
                let refused = mqtt_connect(stream, "intruder").await;
                assert!(refused.is_err(), "{reason}: the client was let in");
            }
            let counted =
                eventually(Duration::from_secs(5), || handshake_failures(&gw, reason) == before + 1);
            assert!(counted.await, "{reason} not counted: {}", gw.gateway.metrics().encode());
        }
    }
    // The good device's connection was not disturbed.
    publish_acked(&mut mqtt, 3, r#"{"seq":3,"temp":20.7}"#.into()).await;
    assert_eq!(rows(&db).len(), 3);
    assert_eq!(device_ids(&db), ["sensor-7"]);

    // mosquitto_pub with a client certificate: its CN names the device too.
    let (ca_file, cert, key) = (pki.ca_file(), good.cert.clone(), good.key.clone());
    let out = tokio::task::spawn_blocking(move || {
        let paths = [&ca_file, &cert, &key].map(|p| p.to_str().unwrap().to_owned());
        let args = ["--cafile", &paths[0], "--cert", &paths[1], "--key", &paths[2]];
        mosquitto_pub(addr, &[&args[..], &["-i", "mosq", "-t", "d/x", "-m", r#"{"seq":4,"t":1}"#]].concat())
    })
    .await
    .unwrap();
    assert!(out.status.success(), "mosquitto_pub failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(eventually(Duration::from_secs(10), || rows(&db).len() == 4).await);
    assert_eq!(device_ids(&db), ["sensor-7"]);
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_client_auth_lets_devices_without_a_certificate_in() {
    let dir = tempfile::tempdir().unwrap();
    let mut pki = Pki::new(dir.path(), "opt");
    let server = pki.server("server", "weir");
    let good = pki.client("good", "meter-1");
    let extra = format!("{}client_auth = \"optional\"\nidentity = \"cn\"\n", mtls(&pki, None));
    let gw = TestGateway::start(&format!(
        "{}{}",
        listener("mqtt", ""),
        tls_table("listeners.tls", &server, &extra)
    ))
    .await;
    let addr = gw.mqtt_addr();
    let anonymous = Client::trusting(&pki.ca_der(), None);
    let mut mqtt = mqtt_connect(anonymous.connect(addr).await.unwrap(), "anon-7").await.unwrap();
    publish_acked(&mut mqtt, 1, r#"{"seq":1,"t":1}"#.into()).await;
    let certified = Client::trusting(&pki.ca_der(), Some(&good));
    let mut mqtt = mqtt_connect(certified.connect(addr).await.unwrap(), "anon-8").await.unwrap();
    publish_acked(&mut mqtt, 1, r#"{"seq":1,"t":1}"#.into()).await;
    assert_eq!(device_ids(&gw.db_path()), ["anon-7", "meter-1"]);
    gw.gateway.shutdown().await;
}

/// A TLS 1.0 or 1.1 ClientHello (no supported_versions extension), as an old client sends it.
fn legacy_client_hello(minor: u8) -> Vec<u8> {
    let mut hello = vec![0x03, minor];
    hello.extend_from_slice(&[0x5a; 32]); // random
    hello.push(0); // no session id
    hello.extend_from_slice(&[0x00, 0x04, 0x00, 0x2f, 0x00, 0x35]); // AES128-SHA, AES256-SHA
    hello.extend_from_slice(&[0x01, 0x00]); // null compression
    let mut handshake = vec![0x01, 0x00, (hello.len() >> 8) as u8, hello.len() as u8];
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x01, (handshake.len() >> 8) as u8, handshake.len() as u8];
    record.extend_from_slice(&handshake);
    record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_0_and_1_1_are_refused_and_min_version_1_3_refuses_1_2() {
    let dir = tempfile::tempdir().unwrap();
    let mut pki = Pki::new(dir.path(), "versions");
    let server = pki.server("server", "weir");
    let text = format!(
        "{}{}{}{}",
        listener("mqtt", ""),
        tls_table("listeners.tls", &server, ""),
        listener("mqtt", ""),
        tls_table("listeners.tls", &server, "min_version = \"1.3\"")
    );
    let gw = TestGateway::start(&text).await;
    let (default, strict) = (gw.gateway.listener_addrs()[0], gw.gateway.listener_addrs()[1]);

    for minor in [1, 2] {
        let mut tcp = TcpStream::connect(default).await.unwrap();
        tcp.write_all(&legacy_client_hello(minor)).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "TLS 1.{} hello: the connection was not closed", minor - 1);
        // Nothing but an alert record (content type 21) comes back: no ServerHello.
        assert!(answer.is_empty() || answer[0] == 21, "TLS 1.{}: got {answer:?}", minor - 1);
    }
    assert!(eventually(Duration::from_secs(5), || handshake_failures(&gw, "incompatible") == 2).await);

    let tls12 = Client::new(&pki.ca_der(), None, &[&rustls::version::TLS12]);
    mqtt_connect(tls12.connect(default).await.unwrap(), "tls12").await.unwrap();
    assert!(tls12.connect(strict).await.is_err(), "TLS 1.2 was accepted under min_version = 1.3");
    let tls13 = Client::new(&pki.ca_der(), None, &[&rustls::version::TLS13]);
    mqtt_connect(tls13.connect(strict).await.unwrap(), "tls13").await.unwrap();
    assert!(eventually(Duration::from_secs(5), || handshake_failures(&gw, "incompatible") == 3).await);
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_handshake_is_closed_at_the_deadline_without_blocking_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let mut pki = Pki::new(dir.path(), "stall");
    let server = pki.server("server", "weir");
    let gw = TestGateway::start(&format!(
        "{}{}",
        listener("mqtt", ""),
        tls_table("listeners.tls", &server, "handshake_timeout_ms = 1500")
    ))
    .await;
    let addr = gw.mqtt_addr();
    let started = Instant::now();
    // One says nothing at all, the other stops halfway through its ClientHello.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut halfway = TcpStream::connect(addr).await.unwrap();
    halfway.write_all(&legacy_client_hello(3)[..20]).await.unwrap();

    // Meanwhile other devices connect and publish.
    let client = Client::trusting(&pki.ca_der(), None);
    let mut mqtt = mqtt_connect(client.connect(addr).await.unwrap(), "prompt").await.unwrap();
    publish_acked(&mut mqtt, 1, reading("prompt", 1)).await;
    assert!(started.elapsed() < Duration::from_millis(1500), "accepts waited for the stalled handshakes");

    for stalled in [&mut silent, &mut halfway] {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stalled.read_to_end(&mut rest)).await.unwrap().ok();
        assert!(rest.is_empty());
    }
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1450), "closed after {waited:?}, before the deadline");
    assert!(waited < Duration::from_secs(5), "closed after {waited:?}");
    // Counted just after the socket closes.
    assert!(eventually(Duration::from_secs(5), || handshake_failures(&gw, "timeout") == 2).await);
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_the_certificate_for_new_connections_and_keeps_open_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut pki = Pki::new(dir.path(), "reload");
    let first = pki.server("server", "weir-first");
    let gw =
        TestGateway::start(&format!("{}{}", listener("mqtt", ""), tls_table("listeners.tls", &first, "")))
            .await;
    let addr = gw.mqtt_addr();
    let client = Client::trusting(&pki.ca_der(), None);
    let served_cert = |stream: &tokio_rustls::client::TlsStream<TcpStream>| {
        stream.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
    };

    let stream = client.connect(addr).await.unwrap();
    assert_eq!(served_cert(&stream), first.der());
    let mut open = mqtt_connect(stream, "long-lived").await.unwrap();
    publish_acked(&mut open, 1, reading("long-lived", 1)).await;

    // A new certificate and key replace the files (as a renewal would), then the reload.
    let first_der = first.der();
    let second = pki.server("server", "weir-second");
    assert_eq!((second.cert.clone(), second.key.clone()), (first.cert.clone(), first.key.clone()));
    assert_eq!(gw.gateway.reload_tls(), weir::TlsReload { reloaded: 1, failed: 0 });
    let stream = client.connect(addr).await.unwrap();
    assert_eq!(served_cert(&stream), second.der());
    assert_ne!(second.der(), first_der);
    publish_acked(&mut mqtt_connect(stream, "after-reload").await.unwrap(), 1, reading("after-reload", 1))
        .await;
    // The connection from before the reload goes on.
    publish_acked(&mut open, 2, reading("long-lived", 2)).await;

    // A broken key file: the reload fails, is counted, and the last good certificate stays.
    std::fs::write(&second.key, "-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n").unwrap();
    assert_eq!(gw.gateway.reload_tls(), weir::TlsReload { reloaded: 0, failed: 1 });
    let stream = client.connect(addr).await.unwrap();
    assert_eq!(served_cert(&stream), second.der());
    mqtt_connect(stream, "after-failed-reload").await.unwrap();
    publish_acked(&mut open, 3, reading("long-lived", 3)).await;
    // So does a missing certificate file.
    std::fs::remove_file(&second.cert).unwrap();
    assert_eq!(gw.gateway.reload_tls(), weir::TlsReload { reloaded: 0, failed: 1 });

    let metrics = gw.gateway.metrics().encode();
    assert!(metrics.contains("weir_tls_reloads_total{result=\"ok\"} 1"), "{metrics}");
    assert!(metrics.contains("weir_tls_reloads_total{result=\"error\"} 2"), "{metrics}");
    assert_eq!(rows(&gw.db_path()).len(), 4);
    gw.gateway.shutdown().await;
}

/// Sends one HTTP/1.1 request over `stream` and returns the status code and body.
async fn http<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, request: &str) -> (u16, String) {
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await.unwrap().ok();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

fn post_ingest(path: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_and_http_ingest_over_mtls() {
    let dir = tempfile::tempdir().unwrap();
    let mut pki = Pki::new(dir.path(), "ws");
    let server = pki.server("server", "weir");
    let good = pki.client("good", "gauge-3");
    let gw = TestGateway::start(&format!(
        "{}{}",
        listener("ws", ""),
        tls_table("listeners.tls", &server, &mtls(&pki, None))
    ))
    .await;
    let addr = gw.gateway.listener_addrs()[0];
    let client = Client::trusting(&pki.ca_der(), Some(&good));

    // WSS /ingest: readings without a device are the certificate's.
    let stream = client.connect(addr).await.unwrap();
    let (mut ws, _) =
        tokio_tungstenite::client_async(format!("wss://localhost:{}/ingest", addr.port()), stream)
            .await
            .unwrap();
    ws.send(Message::text(r#"{"seq":1,"temp":3.5}"#)).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(reply.to_text().unwrap(), r#"{"ack":1,"n":1}"#);
    ws.close(None).await.unwrap();

    // HTTPS POST /ingest likewise; naming the same device is fine, another is refused.
    let stream = client.connect(addr).await.unwrap();
    let (status, body) =
        http(stream, &post_ingest("/ingest?device=gauge-3", r#"{"seq":2,"temp":3.6}"#)).await;
    assert_eq!(status, 200, "{body}");
    let stream = client.connect(addr).await.unwrap();
    let (status, body) =
        http(stream, &post_ingest("/ingest?device=gauge-4", r#"{"seq":3,"temp":3.7}"#)).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("not_authorized") && body.contains("gauge-3"), "{body}");

    // MQTT over WSS (/mqtt): the certificate names the device here too.
    let stream = client.connect(addr).await.unwrap();
    let mut request = format!("wss://localhost:{}/mqtt", addr.port()).into_client_request().unwrap();
    request.headers_mut().insert("sec-websocket-protocol", "mqtt".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream).await.unwrap();
    for packet in
        [connect_packet("ws-client"), publish(QoS::AtLeastOnce, 9, "d/ws", r#"{"seq":5,"t":1}"#.into())]
    {
        let mut out = BytesMut::new();
        encode(&packet, &mut out);
        ws.send(Message::binary(out.freeze())).await.unwrap();
        let answer =
            tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
        let answer = decode(&mut BytesMut::from(&answer.into_data()[..]), 1 << 20).unwrap();
        assert!(matches!(answer, Some(Packet::ConnAck(_) | Packet::PubAck(9))), "{answer:?}");
    }

    // Without a client certificate there is no way in.
    let anonymous = Client::trusting(&pki.ca_der(), None);
    if let Ok(stream) = anonymous.connect(addr).await {
        let (status, _) = http(stream, &post_ingest("/ingest?device=gauge-3", r#"{"seq":4}"#)).await;
        assert_eq!(status, 0);
    }
    let gauge = |seq| ("gauge-3".to_string(), seq);
    assert_eq!(rows(&gw.db_path()), [gauge(1), gauge(2), gauge(5)]);
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_tcp_over_mtls_takes_the_device_from_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let mut pki = Pki::new(dir.path(), "tcp");
    let server = pki.server("server", "weir");
    let good = pki.client("good", "pump-5");
    let gw = TestGateway::start(&format!(
        "{}{}",
        listener("tcp", "framing = \"lines\""),
        tls_table("listeners.tls", &server, &mtls(&pki, None))
    ))
    .await;
    let addr = gw.gateway.listener_addrs()[0];
    let client = Client::trusting(&pki.ca_der(), Some(&good));

    // No hello needed; a hello repeating the identity is fine.
    let (read, mut write) = tokio::io::split(client.connect(addr).await.unwrap());
    let mut lines = BufReader::new(read).lines();
    write.write_all(b"{\"seq\":1,\"temp\":4.5}\n{\"seq\":2,\"temp\":4.6}\n").await.unwrap();
    for _ in 0..2 {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await.unwrap().unwrap();
        assert!(line.as_deref().is_some_and(|l| l.starts_with("{\"ack\"")), "{line:?}");
    }
    drop((lines, write));
    let (read, mut write) = tokio::io::split(client.connect(addr).await.unwrap());
    let mut lines = BufReader::new(read).lines();
    write.write_all(b"{\"hello\":\"pump-5\"}\n{\"seq\":3,\"temp\":4.7}\n").await.unwrap();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await.unwrap().unwrap();
    assert!(line.as_deref().is_some_and(|l| l.starts_with("{\"ack\"")), "{line:?}");
    drop((lines, write));

    // A reading naming another device is refused (and counted); the connection goes on.
    let (read, mut write) = tokio::io::split(client.connect(addr).await.unwrap());
    let mut lines = BufReader::new(read).lines();
    write
        .write_all(b"{\"device_id\":\"pump-6\",\"seq\":9,\"temp\":1.0}\n{\"seq\":4,\"temp\":4.8}\n")
        .await
        .unwrap();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await.unwrap().unwrap();
    assert!(line.as_deref().is_some_and(|l| l.contains("not_authorized")), "{line:?}");
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await.unwrap().unwrap();
    assert!(line.as_deref().is_some_and(|l| l.starts_with("{\"ack\"")), "{line:?}");
    assert_eq!(gw.metric("weir_acl_denied_total"), 1);
    drop((lines, write));

    // A hello naming another device is refused, and the connection closed.
    let (read, mut write) = tokio::io::split(client.connect(addr).await.unwrap());
    let mut lines = BufReader::new(read).lines();
    write.write_all(b"{\"hello\":\"pump-6\"}\n{\"seq\":5,\"temp\":4.8}\n").await.unwrap();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await.unwrap().unwrap();
    assert!(line.as_deref().is_some_and(|l| l.contains("not_authorized")), "{line:?}");
    let end = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await.unwrap();
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");

    assert_eq!(rows(&gw.db_path()), [1, 2, 3, 4].map(|seq| ("pump-5".to_string(), seq)));
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_endpoints_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let mut pki = Pki::new(dir.path(), "ops");
    let server = pki.server("server", "weir-ops");
    let gw = TestGateway::start(&tls_table("ops.tls", &server, "")).await;
    let client = Client::trusting(&pki.ca_der(), None);
    let stream = client.connect(gw.gateway.ops_addr()).await.unwrap();
    let (status, body) =
        http(stream, "GET /metrics HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").await;
    assert_eq!(status, 200);
    assert!(body.contains("weir_tls_handshakes_total{protocol=\"ops\"} 1"), "{body}");
    // Plain HTTP on the TLS port is not answered.
    let (status, _) = http(
        TcpStream::connect(gw.gateway.ops_addr()).await.unwrap(),
        "GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n",
    )
    .await;
    assert_eq!(status, 0);
    gw.gateway.shutdown().await;
}
