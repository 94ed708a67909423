//! Raw TCP ingest end to end, for both framings: a plain TCP client against a whole gateway, with
//! the rows read back from the real SQLite sink.

mod common;

use std::time::Duration;

use bytes::{Buf, BytesMut};
use common::*;
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use weir_proto::v1::device_payload::Body;
use weir_proto::v1::Hello;
use weir_proto::{metric_value::Kind, Ack, AckStatus, DevicePayload, MetricValue, Reading, ReadingBatch};

const WAIT: Duration = Duration::from_secs(10);

/// The two framings, as a device speaks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    LengthPrefixed,
    Lines,
}

const WIRES: [Wire; 2] = [Wire::LengthPrefixed, Wire::Lines];

impl Wire {
    /// A gateway config with one tcp listener of this framing; `extra` adds listener keys.
    fn config(self, extra: &str) -> String {
        let framing = match self {
            Wire::LengthPrefixed => "length_prefixed",
            Wire::Lines => "lines",
        };
        format!(
            "[[listeners]]\nprotocol = \"tcp\"\nlisten = \"127.0.0.1:0\"\nframing = \"{framing}\"\n{extra}\n\
             [fabric]\nlinger_ms = 1\n"
        )
    }

    fn frame(self, body: &[u8], out: &mut Vec<u8>) {
        match self {
            Wire::LengthPrefixed => {
                out.extend_from_slice(&(body.len() as u32).to_be_bytes());
                out.extend_from_slice(body);
            }
            Wire::Lines => {
                out.extend_from_slice(body);
                out.push(b'\n');
            }
        }
    }

    fn framed(self, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        self.frame(body, &mut out);
        out
    }

    fn hello(self, device: &str) -> Vec<u8> {
        match self {
            Wire::LengthPrefixed => {
                let hello = DevicePayload { body: Some(Body::Hello(Hello { device_id: device.into() })) };
                self.framed(&hello.encode_to_vec())
            }
            Wire::Lines => self.framed(format!(r#"{{"hello":"{device}"}}"#).as_bytes()),
        }
    }

    /// One reading with `seq`; `device` None means "the connection's device" (from the hello).
    fn reading(self, device: Option<&str>, seq: u64) -> Vec<u8> {
        let mut out = Vec::new();
        self.push_reading(device, seq, &mut out);
        out
    }

    fn push_reading(self, device: Option<&str>, seq: u64, out: &mut Vec<u8>) {
        match self {
            Wire::LengthPrefixed => {
                let reading = proto_reading(device.unwrap_or(""), seq);
                self.frame(&DevicePayload { body: Some(Body::Reading(reading)) }.encode_to_vec(), out);
            }
            Wire::Lines => {
                let line = match device {
                    Some(device) => format!(r#"{{"device_id":"{device}","seq":{seq},"temp":21.5}}"#),
                    None => format!(r#"{{"seq":{seq},"temp":21.5}}"#),
                };
                self.frame(line.as_bytes(), out);
            }
        }
    }

    /// One message holding readings with each of `seqs`, for the connection's device.
    fn batch(self, seqs: &[u64]) -> Vec<u8> {
        match self {
            Wire::LengthPrefixed => {
                let readings = seqs.iter().map(|&seq| proto_reading("", seq)).collect();
                let batch = ReadingBatch { device_id: String::new(), readings };
                self.framed(&DevicePayload { body: Some(Body::Batch(batch)) }.encode_to_vec())
            }
            Wire::Lines => {
                let readings: Vec<String> =
                    seqs.iter().map(|seq| format!(r#"{{"seq":{seq},"v":1}}"#)).collect();
                self.framed(format!("[{}]", readings.join(",")).as_bytes())
            }
        }
    }

    /// A no-op the framing allows between messages: a zero-length frame, or a blank line.
    fn heartbeat(self) -> Vec<u8> {
        match self {
            Wire::LengthPrefixed => vec![0, 0, 0, 0],
            Wire::Lines => b"  \r\n".to_vec(),
        }
    }

    /// A message that does not decode.
    fn garbage(self) -> Vec<u8> {
        match self {
            Wire::LengthPrefixed => self.framed(&[0xff, 0xff, 0xff]),
            Wire::Lines => self.framed(b"temp=21 not json"),
        }
    }
}

fn proto_reading(device: &str, seq: u64) -> Reading {
    Reading {
        device_id: device.into(),
        seq: Some(seq),
        ts_ms: None,
        metrics: [("temp".to_string(), MetricValue { kind: Some(Kind::Number(21.5)) })].into(),
        tags: Default::default(),
    }
}

/// A reply as the device understands it, whatever its encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Ack { seq: Option<u64>, n: u64 },
    Error { error: String, n: u64, reason: String },
}

impl Answer {
    fn ack(seq: u64, n: u64) -> Self {
        Answer::Ack { seq: Some(seq), n }
    }

    fn error_kind(&self) -> Option<(&str, u64)> {
        match self {
            Answer::Error { error, n, .. } => Some((error.as_str(), *n)),
            Answer::Ack { .. } => None,
        }
    }
}

/// Reads replies off a stream, in the framing's reply encoding.
struct Replies<R> {
    wire: Wire,
    stream: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> Replies<R> {
    /// The next reply, or None once weir closed the connection.
    async fn recv(&mut self) -> Option<Answer> {
        loop {
            if let Some(answer) = self.parse() {
                return Some(answer);
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => {
                    assert!(self.buf.is_empty(), "weir closed inside a reply: {:?}", self.buf);
                    return None;
                }
                Ok(_) => {}
            }
        }
    }

    fn parse(&mut self) -> Option<Answer> {
        match self.wire {
            Wire::LengthPrefixed => {
                let len = u32::from_be_bytes(self.buf.get(..4)?.try_into().unwrap()) as usize;
                if self.buf.len() < 4 + len {
                    return None;
                }
                self.buf.advance(4);
                let ack = Ack::decode(self.buf.split_to(len)).expect("weir sent a valid Ack");
                let error = match ack.status() {
                    AckStatus::Ok => return Some(Answer::Ack { seq: ack.seq, n: ack.n }),
                    AckStatus::Undecodable => "undecodable",
                    AckStatus::TooLarge => "too_large",
                    AckStatus::NotAuthorized => "not_authorized",
                    AckStatus::Unavailable => "unavailable",
                };
                Some(Answer::Error { error: error.into(), n: ack.n, reason: ack.reason })
            }
            Wire::Lines => {
                let newline = self.buf.iter().position(|&b| b == b'\n')?;
                let line = self.buf.split_to(newline + 1);
                let v: serde_json::Value = serde_json::from_slice(&line).expect("weir sent a JSON line");
                let n = v["n"].as_u64().expect("every reply has n");
                if let Some(error) = v["error"].as_str() {
                    let reason = v["reason"].as_str().unwrap_or_default().to_owned();
                    return Some(Answer::Error { error: error.into(), n, reason });
                }
                assert!(v.get("ack").is_some(), "{v}");
                Some(Answer::Ack { seq: v["ack"].as_u64(), n })
            }
        }
    }

    async fn recv_within(&mut self, wait: Duration) -> Result<Option<Answer>, ()> {
        tokio::time::timeout(wait, self.recv()).await.map_err(|_| ())
    }
}

/// A device on a plain TCP connection.
struct Device {
    replies: Replies<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Device {
    async fn open(gw: &TestGateway, wire: Wire) -> Self {
        let stream = TcpStream::connect(gw.gateway.listener_addrs()[0]).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (reader, writer) = stream.into_split();
        Self { replies: Replies { wire, stream: reader, buf: BytesMut::new() }, writer }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    async fn recv(&mut self) -> Option<Answer> {
        self.replies.recv_within(WAIT).await.expect("a reply in time")
    }
}

fn db_rows(gw: &TestGateway) -> Vec<(String, i64)> {
    rows(&gw.db_path())
}

fn has_row(gw: &TestGateway, device: &str, seq: u64) -> bool {
    count(
        &gw.db_path(),
        &format!("SELECT count(*) FROM telemetry WHERE device_id = '{device}' AND seq = {seq}"),
    ) == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_and_readings_become_rows_with_in_order_acks() {
    for wire in WIRES {
        let gw = TestGateway::start(&wire.config("")).await;
        let mut device = Device::open(&gw, wire).await;
        let mut bytes = wire.hello("dev-a");
        for seq in 1..=3 {
            bytes.extend(wire.reading(None, seq));
        }
        bytes.extend(wire.heartbeat());
        bytes.extend(wire.reading(Some("dev-b"), 9));
        bytes.extend(wire.batch(&[11, 10]));
        device.send(&bytes).await;
        let mut answers = Vec::new();
        for _ in 0..5 {
            answers.push(device.recv().await.expect("a reply"));
        }
        assert_eq!(
            answers,
            [Answer::ack(1, 1), Answer::ack(2, 2), Answer::ack(3, 3), Answer::ack(9, 4), Answer::ack(11, 5)],
            "{wire:?}: one reply per message, none for the hello or the heartbeat, n from 1"
        );
        let expected: Vec<(String, i64)> =
            [("dev-a", 1), ("dev-a", 2), ("dev-a", 3), ("dev-a", 10), ("dev-a", 11)]
                .into_iter()
                .chain([("dev-b", 9)])
                .map(|(d, s)| (d.to_owned(), s))
                .collect();
        assert_eq!(db_rows(&gw), expected, "{wire:?}");
        let port = gw.gateway.listener_addrs()[0].port();
        assert_eq!(
            count(
                &gw.db_path(),
                &format!("SELECT count(*) FROM telemetry WHERE protocol = 'tcp' AND source = 'tcp://127.0.0.1:{port}'")
            ),
            6,
            "{wire:?}: protocol and source (the listener address)"
        );
        // Without a hello, each reading names its device; one that does not is undecodable.
        let mut anonymous = Device::open(&gw, wire).await;
        anonymous.send(&wire.reading(Some("dev-c"), 1)).await;
        anonymous.send(&wire.reading(None, 2)).await;
        assert_eq!(anonymous.recv().await, Some(Answer::ack(1, 1)));
        let refused = anonymous.recv().await.unwrap();
        assert_eq!(refused.error_kind(), Some(("undecodable", 2)), "{wire:?}: {refused:?}");
        assert!(has_row(&gw, "dev-c", 1));
        gw.gateway.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_arrive_only_after_the_commit() {
    for wire in WIRES {
        let gw = TestGateway::start(&wire.config("")).await;
        let lock = WriteLock::take(&gw.db_path());
        let mut device = Device::open(&gw, wire).await;
        let mut bytes = wire.hello("safe-dev");
        for seq in 1..=10 {
            bytes.extend(wire.reading(None, seq));
        }
        device.send(&bytes).await;
        assert!(
            eventually(WAIT, || gw.metric("weir_records_enqueued_total") == 10).await,
            "{wire:?}: all ten are inside weir"
        );
        // The sink is retrying against the lock: nothing is committed, so nothing is answered.
        assert_eq!(device.replies.recv_within(Duration::from_secs(1)).await, Err(()), "{wire:?}");
        assert_eq!(count(&gw.db_path(), "SELECT count(*) FROM telemetry"), 0);
        assert!(gw.metric("weir_sink_errors_total") > 0, "the sink met the lock");

        lock.release();
        for seq in 1..=10 {
            assert_eq!(device.recv().await, Some(Answer::ack(seq, seq)), "{wire:?}");
            // Every acknowledged reading is in the table at the moment its ack arrives.
            assert!(has_row(&gw, "safe-dev", seq), "{wire:?}: seq {seq} acked before its commit");
        }
        gw.gateway.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_message_is_dead_lettered_and_the_connection_goes_on() {
    for wire in WIRES {
        let gw = TestGateway::start(&wire.config("")).await;
        let mut device = Device::open(&gw, wire).await;
        let mut bytes = wire.hello("dl-dev");
        bytes.extend(wire.reading(None, 1));
        bytes.extend(wire.garbage());
        device.send(&bytes).await;
        assert_eq!(device.recv().await, Some(Answer::ack(1, 1)));
        let refused = device.recv().await.unwrap();
        assert_eq!(refused.error_kind(), Some(("undecodable", 2)), "{wire:?}: {refused:?}");
        // The error reply follows the dead letter's commit.
        assert_eq!(
            count(
                &gw.db_path(),
                "SELECT count(*) FROM dead_letter WHERE device_id = 'dl-dev' AND protocol = 'tcp'"
            ),
            1,
            "{wire:?}"
        );
        let Answer::Error { reason, .. } = refused else { unreachable!() };
        let expected = match wire {
            Wire::LengthPrefixed => "invalid protobuf DevicePayload",
            Wire::Lines => "invalid JSON",
        };
        assert!(reason.starts_with(expected), "{wire:?}: {reason}");
        // A second hello is a message, and not a valid one.
        device.send(&wire.hello("other-dev")).await;
        let late = device.recv().await.unwrap();
        assert_eq!(late.error_kind(), Some(("undecodable", 3)), "{wire:?}: {late:?}");
        assert_eq!(
            count(&gw.db_path(), "SELECT count(*) FROM dead_letter WHERE device_id = 'dl-dev'"),
            2,
            "{wire:?}: the late hello is kept as a dead letter too"
        );
        // The same connection keeps working.
        device.send(&wire.reading(None, 2)).await;
        assert_eq!(device.recv().await, Some(Answer::ack(2, 4)), "{wire:?}");
        assert_eq!(db_rows(&gw), [("dl-dev".to_owned(), 1), ("dl-dev".to_owned(), 2)], "{wire:?}");
        assert_eq!(gw.metric("weir_connections_closed_total"), 0);
        gw.gateway.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_naming_an_unacceptable_device_is_refused_and_closed() {
    for wire in WIRES {
        let gw = TestGateway::start(&wire.config("")).await;
        let mut device = Device::open(&gw, wire).await;
        let mut bytes = wire.hello("devices/#");
        bytes.extend(wire.reading(Some("d1"), 1));
        device.send(&bytes).await;
        let refused = device.recv().await.unwrap();
        assert_eq!(refused.error_kind(), Some(("undecodable", 1)), "{wire:?}: {refused:?}");
        assert!(format!("{refused:?}").contains("wildcard"), "{refused:?}");
        assert_eq!(device.recv().await, None, "{wire:?}: closed after the refusal");
        assert!(db_rows(&gw).is_empty(), "{wire:?}: nothing after the refused hello is read");
        gw.gateway.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_is_refused_unread_and_closes_only_its_connection() {
    for wire in WIRES {
        let gw = TestGateway::start(&wire.config("max_frame_bytes = 100")).await;
        let mut other = Device::open(&gw, wire).await;
        let mut bytes = wire.hello("other");
        bytes.extend(wire.reading(None, 1));
        other.send(&bytes).await;
        assert_eq!(other.recv().await, Some(Answer::ack(1, 1)));

        let mut device = Device::open(&gw, wire).await;
        device.send(&wire.reading(Some("big"), 1)).await;
        match wire {
            // Only the length prefix is sent: the 1 MB body is refused before it exists.
            Wire::LengthPrefixed => device.send(&1_000_000u32.to_be_bytes()).await,
            // 101 bytes and no newline yet: already longer than the limit.
            Wire::Lines => device.send(&[b'x'; 101]).await,
        }
        assert_eq!(
            device.recv().await,
            Some(Answer::ack(1, 1)),
            "{wire:?}: the message before it is answered"
        );
        let refused = device.recv().await.unwrap();
        assert_eq!(refused.error_kind(), Some(("too_large", 2)), "{wire:?}: {refused:?}");
        let expected = match wire {
            Wire::LengthPrefixed => "frame of 1000000 bytes is larger than the limit of 100 bytes",
            Wire::Lines => "frame of 101 bytes is larger than the limit of 100 bytes",
        };
        assert_eq!(refused, Answer::Error { error: "too_large".into(), n: 2, reason: expected.into() });
        assert_eq!(device.recv().await, None, "{wire:?}: closed after the too_large reply");

        // The connection opened before it keeps working.
        other.send(&wire.reading(None, 2)).await;
        assert_eq!(other.recv().await, Some(Answer::ack(2, 2)), "{wire:?}");
        assert_eq!(db_rows(&gw).len(), 3, "{wire:?}");
        assert!(eventually(WAIT, || gw.metric("weir_connections_closed_total") == 1).await);
        let text = gw.gateway.metrics().encode();
        assert!(
            text.contains(r#"weir_connections_closed_total{protocol="tcp",reason="too_large"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"weir_protocol_errors_total{protocol="tcp",reason="too_large"} 1"#),
            "{text}"
        );
        gw.gateway.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_stops_at_exactly_max_inflight_while_the_sink_is_stalled() {
    const MAX_INFLIGHT: u64 = 8;
    const SENT: u64 = 50;
    for wire in WIRES {
        let gw = TestGateway::start(&wire.config(&format!("max_inflight = {MAX_INFLIGHT}"))).await;
        let lock = WriteLock::take(&gw.db_path());
        let mut device = Device::open(&gw, wire).await;
        let mut bytes = wire.hello("bp-dev");
        for seq in 1..=SENT {
            bytes.extend(wire.reading(None, seq));
        }
        device.send(&bytes).await;
        assert!(
            eventually(WAIT, || gw.metric("weir_messages_received_total") == MAX_INFLIGHT).await,
            "{wire:?}: received {}",
            gw.metric("weir_messages_received_total")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Exactly the bound was taken; the rest waits in the socket, unread.
        assert_eq!(gw.metric("weir_messages_received_total"), MAX_INFLIGHT, "{wire:?}");
        assert_eq!(gw.metric("weir_records_enqueued_total"), MAX_INFLIGHT, "{wire:?}");
        assert_eq!(device.replies.recv_within(Duration::from_millis(100)).await, Err(()));

        lock.release();
        for seq in 1..=SENT {
            assert_eq!(device.recv().await, Some(Answer::ack(seq, seq)), "{wire:?}");
        }
        assert_eq!(db_rows(&gw).len() as u64, SENT);
        assert_eq!(gw.metric("weir_messages_received_total"), SENT);
        gw.gateway.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_burst_in_one_write_is_all_acked() {
    const FRAMES: u64 = 10_000;
    for wire in WIRES {
        // A bound well below a read's worth of frames: reading stops and resumes from the buffer.
        let gw = TestGateway::start(&wire.config("max_inflight = 256")).await;
        let Device { mut replies, mut writer } = Device::open(&gw, wire).await;
        let mut burst = wire.hello("burst-dev");
        for seq in 1..=FRAMES {
            wire.push_reading(None, seq, &mut burst);
        }
        let started = std::time::Instant::now();
        let bytes = burst.len();
        // The device writes everything at once and reads replies meanwhile.
        let write = tokio::spawn(async move {
            writer.write_all(&burst).await.unwrap();
            writer
        });
        for n in 1..=FRAMES {
            let answer = replies.recv_within(WAIT).await.expect("a reply in time");
            assert_eq!(answer, Some(Answer::ack(n, n)), "{wire:?}");
        }
        let elapsed = started.elapsed();
        println!("{wire:?}: {FRAMES} frames ({bytes} bytes) in one write, all acked in {elapsed:?}");
        let _writer = write.await.unwrap();
        assert_eq!(count(&gw.db_path(), "SELECT count(*) FROM telemetry"), FRAMES as i64);
        gw.gateway.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_may_close_its_side_and_still_read_its_replies() {
    for wire in WIRES {
        let gw = TestGateway::start(&wire.config("")).await;
        let Device { mut replies, mut writer } = Device::open(&gw, wire).await;
        let mut bytes = wire.hello("half-dev");
        bytes.extend(wire.reading(None, 1));
        bytes.extend(wire.reading(None, 2));
        if wire == Wire::Lines {
            // The last line may end with the stream instead of a newline.
            bytes.pop();
        }
        writer.write_all(&bytes).await.unwrap();
        writer.shutdown().await.unwrap();
        assert_eq!(replies.recv_within(WAIT).await, Ok(Some(Answer::ack(1, 1))), "{wire:?}");
        assert_eq!(replies.recv_within(WAIT).await, Ok(Some(Answer::ack(2, 2))), "{wire:?}");
        assert_eq!(replies.recv_within(WAIT).await, Ok(None), "{wire:?}: then weir closes");
        assert_eq!(db_rows(&gw).len(), 2);
        gw.gateway.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_what_was_read_then_closes() {
    for wire in WIRES {
        let gw = TestGateway::start(&wire.config("")).await;
        let db = gw.db_path();
        let lock = WriteLock::take(&db);
        let mut device = Device::open(&gw, wire).await;
        let mut bytes = wire.hello("bye-dev");
        for seq in 1..=3 {
            bytes.extend(wire.reading(None, seq));
        }
        device.send(&bytes).await;
        assert!(eventually(WAIT, || gw.metric("weir_records_enqueued_total") == 3).await, "{wire:?}");
        let TestGateway { gateway, dir: _dir } = gw;
        let shutdown = tokio::spawn(gateway.shutdown());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!shutdown.is_finished(), "{wire:?}: shutdown waits for the replies owed");
        lock.release();
        for seq in 1..=3 {
            assert_eq!(device.recv().await, Some(Answer::ack(seq, seq)), "{wire:?}");
        }
        assert_eq!(device.recv().await, None, "{wire:?}: closed once everything read is answered");
        assert!(shutdown.await.unwrap().clean, "{wire:?}");
        assert_eq!(rows(&db).len(), 3, "{wire:?}");
    }
}

/// Paused time: the deadlines are exact, and the test does not wait for them.
#[tokio::test(start_paused = true)]
async fn connect_deadline_and_idle_timeout_close_silent_connections() {
    for wire in WIRES {
        let gw = TestGateway::start(&wire.config("connect_timeout_ms = 5000\nidle_timeout_ms = 30000")).await;
        let started = tokio::time::Instant::now();
        let mut silent = Device::open(&gw, wire).await;
        let mut talking = Device::open(&gw, wire).await;
        tokio::time::sleep(Duration::from_millis(4000)).await;
        talking.send(&wire.hello("talking-dev")).await;

        // The silent connection is closed at its connect deadline.
        assert_eq!(silent.replies.recv_within(Duration::from_secs(60)).await, Ok(None), "{wire:?}");
        let closed_after = started.elapsed();
        assert!(
            (Duration::from_millis(5000)..Duration::from_millis(5100)).contains(&closed_after),
            "{wire:?}: closed after {closed_after:?}"
        );

        // The one that said hello is not; it is served until it stays silent for idle_timeout_ms.
        tokio::time::sleep(Duration::from_millis(20_000)).await;
        talking.send(&wire.reading(None, 1)).await;
        assert_eq!(talking.recv().await, Some(Answer::ack(1, 1)), "{wire:?}");
        let last_input = tokio::time::Instant::now();
        assert_eq!(talking.replies.recv_within(Duration::from_secs(60)).await, Ok(None), "{wire:?}");
        let idle = last_input.elapsed();
        assert!(
            (Duration::from_millis(29_900)..Duration::from_millis(30_100)).contains(&idle),
            "{wire:?}: idle close after {idle:?}"
        );
        let text = gw.gateway.metrics().encode();
        for reason in ["connect_timeout", "idle_timeout"] {
            assert!(
                text.contains(&format!(
                    r#"weir_connections_closed_total{{protocol="tcp",reason="{reason}"}} 1"#
                )),
                "{text}"
            );
        }
        gw.gateway.shutdown().await;
    }
}

/// Paused time: a device waiting for replies weir owes it is not idle, however long the sink
/// holds them back.
#[tokio::test(start_paused = true)]
async fn time_held_back_by_the_sink_does_not_count_as_idle() {
    for wire in WIRES {
        let gw = TestGateway::start(&wire.config("idle_timeout_ms = 30000")).await;
        let lock = WriteLock::take(&gw.db_path());
        let mut device = Device::open(&gw, wire).await;
        let mut bytes = wire.hello("held-dev");
        bytes.extend(wire.reading(None, 1));
        device.send(&bytes).await;
        // Twice the idle timeout with the reply owed: the connection stays.
        assert_eq!(device.replies.recv_within(Duration::from_secs(60)).await, Err(()), "{wire:?}");
        lock.release();
        assert_eq!(device.recv().await, Some(Answer::ack(1, 1)), "{wire:?}");
        // Once nothing is owed, the device's silence counts again.
        let answered = tokio::time::Instant::now();
        assert_eq!(device.replies.recv_within(Duration::from_secs(60)).await, Ok(None), "{wire:?}");
        assert!(answered.elapsed() <= Duration::from_millis(30_100), "{wire:?}: {:?}", answered.elapsed());
        gw.gateway.shutdown().await;
    }
}
