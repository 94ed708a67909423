//! The ws listener with real clients: tokio-tungstenite on `/ingest` (JSON text and protobuf
//! binary messages), rumqttc over WebSocket on `/mqtt`, and curl and raw HTTP on `POST /ingest`.
//! Results are read back from the real SQLite sink.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use weir_proto::{v1::device_payload::Body, Ack, AckStatus, DevicePayload, Reading};

const WS: &str = "[[listeners]]\nprotocol = \"ws\"\nlisten = \"127.0.0.1:0\"\n";

type Client = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(gw: &TestGateway, path: &str) -> Client {
    let url = format!("ws://{}{path}", gw.mqtt_addr());
    let (ws, response) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(response.status(), 101);
    ws
}

/// The next data message, as JSON; pings and pongs are skipped.
async fn next_json(ws: &mut Client, within: Duration) -> Option<serde_json::Value> {
    loop {
        match tokio::time::timeout(within, ws.next()).await {
            Err(_) => return None,
            Ok(Some(Ok(Message::Text(text)))) => return Some(serde_json::from_str(&text).unwrap()),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(other) => panic!("expected a text reply, got {other:?}"),
        }
    }
}

fn text_reading(seq: u64) -> Message {
    Message::Text(format!(r#"{{"seq":{seq},"ts_ms":1700000000000,"metrics":{{"temp":{seq}.5}}}}"#).into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_messages_are_acked_in_order_only_after_commit() {
    let gw = TestGateway::start(WS).await;
    let db = gw.db_path();
    let mut ws = connect(&gw, "/ingest?device=ws-dev-1").await;
    // Make the sink's table exist, then stall it.
    ws.send(text_reading(0)).await.unwrap();
    assert_eq!(next_json(&mut ws, Duration::from_secs(10)).await.unwrap()["ack"], 0);
    let lock = WriteLock::take(&db);
    for seq in 1..=20 {
        ws.send(text_reading(seq)).await.unwrap();
    }
    assert!(
        next_json(&mut ws, Duration::from_millis(700)).await.is_none(),
        "no ack may leave while the sink cannot commit"
    );
    lock.release();
    for seq in 1..=20u64 {
        let reply = next_json(&mut ws, Duration::from_secs(10)).await.expect("ack after release");
        assert_eq!(reply["ack"], seq, "{reply}");
        assert_eq!(reply["n"], seq + 1, "{reply}");
        let stored = count(
            &db,
            &format!("SELECT count(*) FROM telemetry WHERE device_id = 'ws-dev-1' AND seq = {seq}"),
        );
        assert_eq!(stored, 1, "seq {seq} was acked before it was stored");
    }
    assert_eq!(rows(&db).len(), 21);
    assert_eq!(count(&db, "SELECT count(*) FROM telemetry WHERE protocol = 'ws' AND source = '/ingest'"), 21);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_messages_get_protobuf_acks() {
    let gw = TestGateway::start(WS).await;
    let mut ws = connect(&gw, "/ingest").await; // no ?device=: the readings name it
    for seq in [7u64, 8] {
        let reading = Reading { device_id: "pb-dev".into(), seq: Some(seq), ..Reading::default() };
        let payload = DevicePayload { body: Some(Body::Reading(reading)) }.encode_to_vec();
        ws.send(Message::Binary(payload.into())).await.unwrap();
    }
    for (n, seq) in [(1u64, 7u64), (2, 8)] {
        let message =
            tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
        let Message::Binary(bytes) = message else { panic!("expected a binary ack, got {message:?}") };
        let ack = Ack::decode(bytes.as_ref()).unwrap();
        assert_eq!((ack.n, ack.seq, ack.status()), (n, Some(seq), AckStatus::Ok));
    }
    assert_eq!(rows(&gw.db_path()), vec![("pb-dev".to_owned(), 7), ("pb-dev".to_owned(), 8)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_message_is_dead_lettered_answered_and_the_connection_keeps_working() {
    let gw = TestGateway::start(WS).await;
    let db = gw.db_path();
    let mut ws = connect(&gw, "/ingest?device=bad-dev").await;
    ws.send(Message::Text("temperature=21".into())).await.unwrap();
    let reply = next_json(&mut ws, Duration::from_secs(10)).await.unwrap();
    assert_eq!(reply["error"], "undecodable", "{reply}");
    assert_eq!(reply["n"], 1);
    assert!(reply["reason"].as_str().unwrap().contains("JSON"), "{reply}");
    assert_eq!(count(&db, "SELECT count(*) FROM dead_letter WHERE device_id = 'bad-dev'"), 1);
    ws.send(text_reading(5)).await.unwrap();
    let reply = next_json(&mut ws, Duration::from_secs(10)).await.unwrap();
    assert_eq!((reply["ack"].as_u64(), reply["n"].as_u64()), (Some(5), Some(2)), "{reply}");
    assert_eq!(rows(&db), vec![("bad-dev".to_owned(), 5)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_gets_an_error_and_a_close_and_others_are_unaffected() {
    let gw = TestGateway::start(&format!("{WS}max_message_bytes = 4096\nmax_frame_bytes = 4096\n")).await;
    let mut bystander = connect(&gw, "/ingest?device=bystander").await;
    let mut big = connect(&gw, "/ingest?device=big").await;
    big.send(text_reading(1)).await.unwrap();
    assert_eq!(next_json(&mut big, Duration::from_secs(10)).await.unwrap()["ack"], 1);
    let huge = format!(r#"{{"seq":2,"metrics":{{"blob":"{}"}}}}"#, "x".repeat(10_000));
    big.send(Message::Text(huge.into())).await.unwrap();
    let reply = next_json(&mut big, Duration::from_secs(10)).await.unwrap();
    assert_eq!(reply["error"], "too_large", "{reply}");
    assert!(reply["reason"].as_str().unwrap().contains("4096"), "{reply}");
    match tokio::time::timeout(Duration::from_secs(5), big.next()).await.unwrap() {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Size),
        other => panic!("expected a close with code 1009, got {other:?}"),
    }
    bystander.send(text_reading(3)).await.unwrap();
    assert_eq!(next_json(&mut bystander, Duration::from_secs(10)).await.unwrap()["ack"], 3);
    assert_eq!(rows(&gw.db_path()), vec![("big".to_owned(), 1), ("bystander".to_owned(), 3)]);
    assert!(gw.metric("weir_protocol_errors_total") >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_over_websocket_publishes_qos_1_and_2() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, Transport};
    let gw = TestGateway::start(WS).await;
    let addr = gw.mqtt_addr();
    let mut options = MqttOptions::new("ws-mqtt-dev", format!("ws://{addr}/mqtt"), addr.port());
    options.set_transport(Transport::Ws);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let total = 40u64;
    tokio::spawn(async move {
        for seq in 0..total {
            let qos = if seq % 2 == 0 { QoS::AtLeastOnce } else { QoS::ExactlyOnce };
            client
                .publish("devices/ws-mqtt-dev/telemetry", qos, false, reading("ws-mqtt-dev", seq))
                .await
                .unwrap();
        }
        // Keep the client (and so the connection) alive until the test ends.
        std::future::pending::<()>().await;
    });
    let mut done = 0;
    tokio::time::timeout(Duration::from_secs(30), async {
        while done < total {
            if let Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_)) = eventloop.poll().await.unwrap() {
                done += 1;
            }
        }
    })
    .await
    .expect("every publish acknowledged");
    let rows = rows(&gw.db_path());
    assert_eq!(rows.len(), total as usize);
    assert!(rows.iter().enumerate().all(|(i, (d, s))| d == "ws-mqtt-dev" && *s == i as i64));
    assert_eq!(
        count(&gw.db_path(), "SELECT count(*) FROM telemetry WHERE protocol = 'mqtt_ws'"),
        total as i64
    );
}

/// A minimal HTTP/1.1 exchange on a fresh connection: returns (status, headers, body).
async fn http_post(gw: &TestGateway, path: &str, content_type: &str, body: &[u8]) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(gw.mqtt_addr()).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: weir\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // The server may answer (413) before reading the body and close.
    let _ = stream.write_all(body).await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut response)).await.unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_post_answers_after_commit_with_per_item_results() {
    let gw = TestGateway::start(&format!("{WS}max_message_bytes = 8192\n")).await;
    let db = gw.db_path();
    let (status, _, body) =
        http_post(&gw, "/ingest?device=hook-1", "application/json", br#"[{"seq":1,"t":1},{"seq":2,"t":2}]"#)
            .await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["accepted"], 2);
    assert_eq!(v["results"][1]["ack"], 2);
    assert_eq!(rows(&db), vec![("hook-1".to_owned(), 1), ("hook-1".to_owned(), 2)]);

    // One bad item among good ones: 400, the bad one dead-lettered with its reason, the rest stored.
    let (status, _, body) = http_post(
        &gw,
        "/ingest?device=hook-1",
        "application/json",
        br#"[{"seq":3,"t":3},"oops",{"seq":4,"t":4}]"#,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["accepted"], 2);
    assert_eq!(v["results"][1]["error"], "undecodable", "{body}");
    assert_eq!(rows(&db).len(), 4);
    assert_eq!(count(&db, "SELECT count(*) FROM dead_letter WHERE device_id = 'hook-1'"), 1);

    // Too large: 413 before the body is stored.
    let (status, _, body) = http_post(
        &gw,
        "/ingest?device=hook-1",
        "application/json",
        format!("[{}]", "1,".repeat(9000)).as_bytes(),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("too_large"), "{body}");

    // Protobuf body.
    let reading = Reading { seq: Some(9), ..Reading::default() };
    let payload = DevicePayload { body: Some(Body::Reading(reading)) }.encode_to_vec();
    let (status, _, body) = http_post(&gw, "/ingest?device=hook-2", "application/x-protobuf", &payload).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        count(&db, "SELECT count(*) FROM telemetry WHERE device_id = 'hook-2' AND protocol = 'http'"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_post_with_curl_waits_for_the_commit() {
    let gw = TestGateway::start(WS).await;
    let db = gw.db_path();
    let url = format!("http://{}/ingest", gw.mqtt_addr());
    let post = |body: &'static str| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("curl")
                .args(["-sS", "-H", "X-Device-Id: curl-dev", "-H", "Content-Type: application/json"])
                .args(["--data-binary", body, "-w", "\n%{http_code}", &url])
                .output()
                .expect("curl runs")
        })
    };
    let out = post(r#"{"seq":1,"metrics":{"t":1}}"#).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.ends_with("200"), "{text}");
    let lock = WriteLock::take(&db);
    let pending = post(r#"{"seq":2,"metrics":{"t":2}}"#);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!pending.is_finished(), "the answer waits for the commit");
    lock.release();
    let out = pending.await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.ends_with("200") && text.contains(r#""ack":2"#), "{text}");
    assert_eq!(rows(&db), vec![("curl-dev".to_owned(), 1), ("curl-dev".to_owned(), 2)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_post_is_told_to_retry_when_the_fabric_is_full() {
    let gw =
        TestGateway::start(&format!("{WS}[fabric]\nshards = 1\nmax_records = 4\nbatch_max_records = 4\n"))
            .await;
    let db = gw.db_path();
    let (status, _, _) =
        http_post(&gw, "/ingest?device=busy", "application/json", br#"{"seq":0,"t":0}"#).await;
    assert_eq!(status, 200);
    let lock = WriteLock::take(&db);
    // Four records fill the shard while the sink is stalled; the request waits for their commit.
    let first = tokio::spawn({
        let addr = gw.mqtt_addr();
        async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let body = br#"[{"seq":1},{"seq":2},{"seq":3},{"seq":4}]"#;
            let head = format!(
                "POST /ingest?device=busy HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            stream.write_all(head.as_bytes()).await.unwrap();
            stream.write_all(body).await.unwrap();
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await.unwrap();
            String::from_utf8_lossy(&response).into_owned()
        }
    });
    assert!(eventually(Duration::from_secs(5), || gw.metric("weir_records_enqueued_total") >= 5).await);
    let (status, head, body) =
        http_post(&gw, "/ingest?device=busy", "application/json", br#"{"seq":5,"t":5}"#).await;
    assert_eq!(status, 503, "{body}");
    assert!(head.to_ascii_lowercase().contains("retry-after: 1"), "{head}");
    assert!(body.contains("unavailable"), "{body}");
    lock.release();
    let first = first.await.unwrap();
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert_eq!(rows(&db).len(), 5, "seq 5 was refused, not stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_bad_upgrades_get_clear_http_errors() {
    let gw = TestGateway::start(WS).await;
    let (status, _, _) = http_post(&gw, "/nope", "application/json", b"{}").await;
    assert_eq!(status, 404);
    let err = tokio_tungstenite::connect_async(format!("ws://{}/ingest?device=a%23b", gw.mqtt_addr())).await;
    match err {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 400),
        other => panic!("a device id with a wildcard must be refused, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_device_has_at_most_max_inflight_messages_taken_while_the_sink_is_stalled() {
    let gw = TestGateway::start(&format!("{WS}max_inflight = 5\n")).await;
    let db = gw.db_path();
    let mut ws = connect(&gw, "/ingest?device=bp-dev").await;
    ws.send(text_reading(0)).await.unwrap();
    assert_eq!(next_json(&mut ws, Duration::from_secs(10)).await.unwrap()["ack"], 0);
    let lock = WriteLock::take(&db);
    for seq in 1..=40 {
        ws.send(text_reading(seq)).await.unwrap();
    }
    let received = || gw.metric("weir_messages_received_total");
    assert!(eventually(Duration::from_secs(5), || received() == 6).await, "got {}", received());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(received(), 6, "exactly max_inflight messages are read while none is answered");
    lock.release();
    for seq in 1..=40u64 {
        let reply = next_json(&mut ws, Duration::from_secs(10)).await.expect("ack after release");
        assert_eq!(reply["ack"], seq, "{reply}");
    }
    assert_eq!(rows(&db).len(), 41);
}

/// MQTT over WebSocket: packets split across binary messages and several packets in one message
/// are one byte stream; acks still wait for the commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_packets_may_span_websocket_messages_and_acks_wait_for_the_commit() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use weir_protocols::mqtt::{self, QoS};

    let gw = TestGateway::start(WS).await;
    let db = gw.db_path();
    let mut request = format!("ws://{}/mqtt", gw.mqtt_addr()).into_client_request().unwrap();
    request.headers_mut().insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.headers().get("Sec-WebSocket-Protocol").unwrap(), "mqtt");

    let bytes = |packet: &mqtt::Packet| {
        let mut out = bytes::BytesMut::new();
        mqtt::encode(packet, &mut out);
        out.to_vec()
    };
    // CONNECT in two messages, split inside its variable header.
    let connect = bytes(&connect_packet("ws-split"));
    ws.send(Message::Binary(connect[..5].to_vec().into())).await.unwrap();
    ws.send(Message::Binary(connect[5..].to_vec().into())).await.unwrap();
    let mut received = bytes::BytesMut::new();
    let mut next_packet = async |ws: &mut Client| loop {
        if let Some(packet) = mqtt::decode(&mut received, 1 << 20).unwrap() {
            return Some(packet);
        }
        match tokio::time::timeout(Duration::from_millis(700), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => received.extend_from_slice(&b),
            Ok(Some(Ok(_))) => {}
            _ => return None,
        }
    };
    assert!(matches!(next_packet(&mut ws).await, Some(mqtt::Packet::ConnAck(_))));
    // Make the table exist, then stall the sink.
    ws.send(Message::Binary(
        bytes(&publish(QoS::AtLeastOnce, 1, "t/ws-split", reading("ws-split", 0))).into(),
    ))
    .await
    .unwrap();
    assert!(matches!(next_packet(&mut ws).await, Some(mqtt::Packet::PubAck(_))));
    let lock = WriteLock::take(&db);
    // Two publishes: the first split in three messages, the second sharing the last one.
    let first = bytes(&publish(QoS::AtLeastOnce, 2, "t/ws-split", reading("ws-split", 1)));
    let second = bytes(&publish(QoS::AtLeastOnce, 3, "t/ws-split", reading("ws-split", 2)));
    ws.send(Message::Binary(first[..3].to_vec().into())).await.unwrap();
    ws.send(Message::Binary(first[3..20].to_vec().into())).await.unwrap();
    let mut tail = first[20..].to_vec();
    tail.extend_from_slice(&second);
    ws.send(Message::Binary(tail.into())).await.unwrap();
    assert!(next_packet(&mut ws).await.is_none(), "no PUBACK while the sink cannot commit");
    lock.release();
    for pkid in [2, 3] {
        match next_packet(&mut ws).await {
            Some(mqtt::Packet::PubAck(id)) => assert_eq!(id, pkid),
            other => panic!("expected PUBACK {pkid}, got {other:?}"),
        }
    }
    assert_eq!(rows(&db).len(), 3);
}
