//! What a simulated device writes and how it reads the server's answers, per protocol, with no
//! sockets: messages are appended to a write buffer so many go out in one write, and answers
//! are parsed from a read buffer into [`Answer`]s in arrival order.

use std::io::Write as _;

use bytes::{Buf, BytesMut};
use prost::Message as _;
use weir_proto::v1::{device_payload, Hello};
use weir_proto::{Ack, AckStatus, DevicePayload, MetricValue, Reading};
use weir_protocols::framing::{encode_frame, Framing};
use weir_protocols::mqtt::{self, Packet, Properties, ProtocolVersion, ReasonCode};

use super::{PayloadFormat, Protocol};
use crate::payload::{TelemetryPayload, HUM, TEMP};

/// Largest answer accepted from the server (an ack is a few bytes; a CONNACK with properties a
/// few hundred). Anything larger is not an answer to a device.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// One answer from the server, in the order the server sent them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The MQTT connection is accepted; `receive_maximum` is the MQTT 5 server's in-flight cap.
    ConnAck { receive_maximum: Option<u16> },
    /// MQTT CONNACK refusing the connection.
    ConnRefused(String),
    /// The oldest unanswered message is stored (PUBACK, ack frame, `{"ack":..}`).
    Acked,
    /// The oldest unanswered message was answered with an error; the reason as the server gave it.
    Refused(String),
    /// The server is closing the connection (MQTT 5 DISCONNECT), with its reason.
    Disconnect(String),
    /// Nothing for the device (PINGRESP, a WebSocket ping).
    Other,
}

/// Why the server's bytes could not be read.
#[derive(Debug, thiserror::Error)]
#[error("undecodable answer: {0}")]
pub struct AnswerError(pub String);

/// Builds one device's messages in the group's payload format.
#[derive(Debug, Clone)]
pub struct Payloads {
    format: PayloadFormat,
    json: TelemetryPayload,
    device_id: String,
    bytes: usize,
}

impl Payloads {
    pub fn new(format: PayloadFormat, device_id: &str, bytes: usize) -> Self {
        Self {
            format,
            json: TelemetryPayload::new(device_id.to_owned(), bytes),
            device_id: device_id.to_owned(),
            bytes,
        }
    }

    /// Appends message `seq` to `out`.
    pub fn write(&self, seq: u64, ts_ms: u64, out: &mut Vec<u8>) {
        match self.format {
            PayloadFormat::Json => out.extend_from_slice(&self.json.build(seq, ts_ms)),
            PayloadFormat::Protobuf => {
                let unpadded = reading(&self.device_id, seq, ts_ms, String::new());
                // The pad tag costs its map entry's key and length bytes too (about 10): the
                // message comes out within a few bytes of the size asked for.
                let pad = self.bytes.saturating_sub(reading_payload(unpadded).encoded_len() + 10);
                let padded = reading_payload(reading(&self.device_id, seq, ts_ms, "x".repeat(pad)));
                padded.encode(out).expect("a Vec grows as needed");
            }
        }
    }
}

fn reading(device_id: &str, seq: u64, ts_ms: u64, pad: String) -> Reading {
    let number = |value| MetricValue { kind: Some(weir_proto::metric_value::Kind::Number(value)) };
    let mut tags = std::collections::BTreeMap::new();
    if !pad.is_empty() {
        tags.insert("pad".to_owned(), pad);
    }
    Reading {
        device_id: device_id.to_owned(),
        seq: Some(seq),
        ts_ms: Some(ts_ms as i64),
        metrics: [("temp".to_owned(), number(TEMP)), ("hum".to_owned(), number(HUM))].into(),
        tags,
    }
}

fn reading_payload(reading: Reading) -> DevicePayload {
    DevicePayload { body: Some(device_payload::Body::Reading(reading)) }
}

/// The MQTT version a protocol speaks, if it is MQTT.
pub fn mqtt_version(protocol: Protocol) -> Option<ProtocolVersion> {
    match protocol {
        Protocol::Mqtt3 => Some(ProtocolVersion::V311),
        Protocol::Mqtt5 | Protocol::MqttWs => Some(ProtocolVersion::V5),
        Protocol::Ws | Protocol::Tcp | Protocol::TcpLines => None,
    }
}

/// The CONNECT of an MQTT device: clean session, keepalive `keepalive_s`.
pub fn write_connect(version: ProtocolVersion, client_id: &str, keepalive_s: u16, out: &mut BytesMut) {
    let connect = mqtt::Connect {
        protocol_level: version.level(),
        clean_session: true,
        keep_alive_secs: keepalive_s,
        client_id: client_id.to_owned(),
        will: None,
        username: None,
        password: None,
    };
    let packet = Packet::connect(connect);
    mqtt::encode(&packet, out);
}

/// Appends one PUBLISH (no properties in MQTT 5). `pkid` is ignored at QoS 0.
pub fn write_publish(
    version: ProtocolVersion,
    qos: u8,
    pkid: u16,
    topic: &str,
    payload: &[u8],
    out: &mut Vec<u8>,
) {
    let properties_len = usize::from(version.is_v5());
    let pkid_len = if qos > 0 { 2 } else { 0 };
    let remaining = 2 + topic.len() + pkid_len + properties_len + payload.len();
    out.push(0x30 | (qos << 1));
    let mut len = remaining;
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    if qos > 0 {
        out.extend_from_slice(&pkid.to_be_bytes());
    }
    if version.is_v5() {
        out.push(0);
    }
    out.extend_from_slice(payload);
}

/// MQTT DISCONNECT (normal), for a clean end of the run.
pub fn write_disconnect(version: ProtocolVersion, out: &mut BytesMut) {
    if version.is_v5() {
        let normal = mqtt::DisconnectV5 { reason: ReasonCode::Success, properties: Properties::default() };
        mqtt::encode(&Packet::DisconnectV5(normal), out);
    } else {
        mqtt::encode(&Packet::Disconnect, out);
    }
}

/// The first frame or line of a raw TCP device: names the device.
pub fn write_hello(protocol: Protocol, device_id: &str, out: &mut Vec<u8>) {
    match protocol {
        Protocol::Tcp => {
            let hello = DevicePayload {
                body: Some(device_payload::Body::Hello(Hello { device_id: device_id.to_owned() })),
            };
            encode_frame(Framing::LengthPrefixed, &hello.encode_to_vec(), out);
        }
        Protocol::TcpLines => {
            // Device ids are restricted to characters that need no JSON escaping.
            let _ = writeln!(out, r#"{{"hello":"{device_id}"}}"#);
        }
        _ => {}
    }
}

/// Frames one message body for a raw TCP listener (`body` already in the group's format).
pub fn write_tcp_message(protocol: Protocol, body: &[u8], out: &mut Vec<u8>) {
    match protocol {
        Protocol::TcpLines => {
            out.extend_from_slice(body);
            out.push(b'\n');
        }
        _ => encode_frame(Framing::LengthPrefixed, body, out),
    }
}

/// Parses the answers in `buf` (consuming what it parsed) for a byte-stream protocol: MQTT over
/// TCP or WebSocket, or raw TCP.
pub fn parse_stream(
    protocol: Protocol,
    buf: &mut BytesMut,
    answers: &mut Vec<Answer>,
) -> Result<(), AnswerError> {
    match protocol {
        Protocol::Mqtt3 | Protocol::Mqtt5 | Protocol::MqttWs => {
            let version = mqtt_version(protocol).unwrap_or_default();
            let decoder = mqtt::Decoder::new(version, MAX_ANSWER_BYTES);
            while let Some(packet) = decoder.decode(buf).map_err(|e| AnswerError(e.to_string()))? {
                answers.push(mqtt_answer(packet)?);
            }
        }
        Protocol::Tcp => loop {
            if buf.len() < 4 {
                break;
            }
            let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if len > MAX_ANSWER_BYTES {
                return Err(AnswerError(format!("an answer frame of {len} bytes")));
            }
            if buf.len() < 4 + len {
                break;
            }
            buf.advance(4);
            let frame = buf.split_to(len);
            if len > 0 {
                answers.push(ack_frame(&frame)?);
            }
        },
        Protocol::TcpLines => {
            while let Some(end) = buf.iter().position(|&b| b == b'\n') {
                let line = buf.split_to(end + 1);
                let line = &line[..end];
                if !line.iter().all(u8::is_ascii_whitespace) {
                    answers.push(json_answer(line)?);
                }
            }
            if buf.len() > MAX_ANSWER_BYTES {
                return Err(AnswerError(format!("an answer line over {MAX_ANSWER_BYTES} bytes")));
            }
        }
        Protocol::Ws => {
            return Err(AnswerError("WebSocket ingest answers are messages, not a stream".into()))
        }
    }
    Ok(())
}

fn mqtt_answer(packet: Packet) -> Result<Answer, AnswerError> {
    Ok(match packet {
        Packet::ConnAck(ack) if ack.code == mqtt::ConnectReturnCode::Accepted => {
            Answer::ConnAck { receive_maximum: None }
        }
        Packet::ConnAck(ack) => Answer::ConnRefused(format!("CONNACK {:?}", ack.code)),
        Packet::ConnAckV5(ack) if !ack.reason.is_error() => {
            Answer::ConnAck { receive_maximum: ack.properties.receive_maximum }
        }
        Packet::ConnAckV5(ack) => Answer::ConnRefused(reason_text("CONNACK", ack.reason, &ack.properties)),
        Packet::PubAck(_) => Answer::Acked,
        Packet::PubAckV5(ack) if !ack.reason.is_error() => Answer::Acked,
        Packet::PubAckV5(ack) => Answer::Refused(reason_text("PUBACK", ack.reason, &ack.properties)),
        Packet::DisconnectV5(disconnect) => {
            Answer::Disconnect(reason_text("DISCONNECT", disconnect.reason, &disconnect.properties))
        }
        Packet::PingResp => Answer::Other,
        other => return Err(AnswerError(format!("unexpected {other:?}"))),
    })
}

fn reason_text(packet: &str, reason: ReasonCode, properties: &Properties) -> String {
    match &properties.reason_string {
        Some(text) => format!("{packet} {reason:?} (0x{:02X}): {text}", reason as u8),
        None => format!("{packet} {reason:?} (0x{:02X})", reason as u8),
    }
}

/// A `weir.v1.Ack` (raw TCP frame, WebSocket binary message).
pub fn ack_frame(bytes: &[u8]) -> Result<Answer, AnswerError> {
    let ack = Ack::decode(bytes).map_err(|e| AnswerError(format!("not a weir.v1.Ack: {e}")))?;
    if ack.status == AckStatus::Ok as i32 {
        return Ok(Answer::Acked);
    }
    let status =
        AckStatus::try_from(ack.status).map_or_else(|_| ack.status.to_string(), |s| format!("{s:?}"));
    Ok(Answer::Refused(format!("{status}: {}", ack.reason)))
}

/// A JSON answer (NDJSON line, WebSocket text message): `{"ack":..,"n":..}` or
/// `{"error":..,"reason":..,"n":..}`.
pub fn json_answer(bytes: &[u8]) -> Result<Answer, AnswerError> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| AnswerError(format!("not JSON ({e}): {}", String::from_utf8_lossy(bytes))))?;
    if let Some(error) = value.get("error") {
        let reason = value.get("reason").and_then(|r| r.as_str()).unwrap_or("");
        return Ok(Answer::Refused(format!("{}: {reason}", error.as_str().unwrap_or("?"))));
    }
    if value.get("n").is_some() {
        return Ok(Answer::Acked);
    }
    Err(AnswerError(format!("neither an ack nor an error: {value}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishes_decode_with_the_servers_codec() {
        for (version, qos) in [
            (ProtocolVersion::V311, 0),
            (ProtocolVersion::V311, 1),
            (ProtocolVersion::V5, 0),
            (ProtocolVersion::V5, 1),
        ] {
            // 200 bytes: the remaining length needs two bytes.
            let payload = vec![b'p'; 200];
            let mut out = Vec::new();
            write_publish(version, qos, 77, "devices/d-1/telemetry", &payload, &mut out);
            write_publish(version, qos, 78, "t", b"{}", &mut out);
            let decoder = mqtt::Decoder::new(version, MAX_ANSWER_BYTES);
            let mut buf = BytesMut::from(&out[..]);
            let first = decoder.decode(&mut buf).unwrap().unwrap();
            let second = decoder.decode(&mut buf).unwrap().unwrap();
            assert!(buf.is_empty());
            match (version, first, second) {
                (ProtocolVersion::V311, Packet::Publish(a), Packet::Publish(b)) => {
                    assert_eq!(
                        (a.topic.as_str(), &a.payload[..], a.qos as u8),
                        ("devices/d-1/telemetry", &payload[..], qos)
                    );
                    assert_eq!(a.pkid, if qos > 0 { 77 } else { 0 });
                    assert_eq!((b.topic.as_str(), &b.payload[..]), ("t", &b"{}"[..]));
                }
                (ProtocolVersion::V5, Packet::PublishV5(a), Packet::PublishV5(b)) => {
                    assert_eq!(a.publish.topic, "devices/d-1/telemetry");
                    assert_eq!(&a.publish.payload[..], &payload[..]);
                    assert_eq!(a.publish.qos as u8, qos);
                    assert!(a.properties.is_empty());
                    assert_eq!(&b.publish.payload[..], b"{}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn mqtt_answers_in_order_with_refusals_and_the_receive_maximum() {
        let mut buf = BytesMut::new();
        let props = Properties { receive_maximum: Some(20), ..Properties::default() };
        mqtt::encode(
            &Packet::ConnAckV5(mqtt::ConnAckV5 {
                session_present: false,
                reason: ReasonCode::Success,
                properties: props,
            }),
            &mut buf,
        );
        mqtt::encode(&Packet::PubAckV5(mqtt::AckV5::success(1)), &mut buf);
        let refused = mqtt::AckV5 {
            pkid: 2,
            reason: ReasonCode::PayloadFormatInvalid,
            properties: Properties { reason_string: Some("bad".into()), ..Properties::default() },
        };
        mqtt::encode(&Packet::PubAckV5(refused), &mut buf);
        let mut tail = BytesMut::new();
        mqtt::encode(&Packet::PubAckV5(mqtt::AckV5::success(3)), &mut tail);
        buf.extend_from_slice(&tail[..1]);
        let mut answers = Vec::new();
        parse_stream(Protocol::Mqtt5, &mut buf, &mut answers).unwrap();
        assert_eq!(answers.len(), 3);
        assert_eq!(answers[0], Answer::ConnAck { receive_maximum: Some(20) });
        assert_eq!(answers[1], Answer::Acked);
        assert!(
            matches!(&answers[2], Answer::Refused(r) if r.contains("0x99") && r.contains("bad")),
            "{answers:?}"
        );
        assert_eq!(buf.len(), 1, "a partial packet stays for the next read");
    }
}
