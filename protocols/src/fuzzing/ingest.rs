//! One WebSocket `/ingest` message as the gateway handles it with protocols' pieces: the device
//! id the URL names is checked, a text message is decoded as JSON and a binary one as protobuf
//! (default limits), and the reply is encoded in the message's format. The WebSocket framing
//! itself is tungstenite's and out of scope.
//!
//! Input: `[flags, id_len, device id (id_len bytes), message...]`: `flags & 1` makes the
//! message binary (a text message is the bytes as lossy UTF-8, as WebSocket text is always
//! UTF-8), `flags & 2` keeps the raw payload, `flags & 4` numbers the message `u64::MAX`.
//! Checked: the records as for the payload targets; the reply decodes (JSON: UTF-8, one line,
//! exactly the fields of its status; protobuf: the same `Ack`) and, framed for raw TCP, cuts
//! back into exactly itself.

use bytes::BytesMut;
use prost::Message as _;
use serde_json::Value;
use weir_proto::{Ack, SourceProtocol};

use super::payload::decode_checked;
use super::Input;
use crate::framing::{check_device_id, write_reply, Frame, Framer, Framing};
use crate::payload::{DecodeContext, PayloadFormat, PayloadLimits};
use crate::reply::{Reply, ReplyFormat, Status};

pub fn ws_ingest(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    let id_len = usize::from(input.u8());
    let device = String::from_utf8_lossy(input.bytes(id_len)).into_owned();
    // The upgrade is refused (HTTP 400) for a device id that does not pass.
    if !device.is_empty() && check_device_id(&device).is_err() {
        return;
    }
    let message = input.rest();
    let text;
    let (payload, format, reply_format) = if flags & 1 == 1 {
        (message, PayloadFormat::Protobuf, ReplyFormat::Protobuf)
    } else {
        text = String::from_utf8_lossy(message).into_owned();
        (text.as_bytes(), PayloadFormat::Json, ReplyFormat::Json)
    };
    let ctx = DecodeContext {
        fallback_device_id: &device,
        protocol: SourceProtocol::Websocket,
        source: "/ingest",
        received_ts_ms: 1_700_000_000_000,
        keep_raw: flags & 2 == 2,
        limits: PayloadLimits::default(),
    };
    let n = if flags & 4 == 4 { u64::MAX } else { 1 };
    let reply = match decode_checked(format, payload, &ctx) {
        Some(records) => Reply {
            n,
            seq: records.iter().filter_map(|r| r.seq).max(),
            status: Status::Ok,
            reason: String::new(),
            format: reply_format,
        },
        None => {
            let mut out = Vec::new();
            let error = crate::payload::decode(format, payload, &ctx, &mut out).expect_err("failed before");
            Reply {
                n,
                seq: None,
                status: Status::Undecodable,
                reason: error.to_string(),
                format: reply_format,
            }
        }
    };
    check_reply(&reply);
    // The other statuses carry reasons weir writes; with one taken from the message, the
    // encoding must hold up just the same.
    let reason = String::from_utf8_lossy(message).into_owned();
    for status in [Status::TooLarge, Status::NotAuthorized, Status::Unavailable] {
        check_reply(&Reply { status, reason: reason.clone(), seq: Some(n), ..reply.clone() });
    }
}

fn check_reply(reply: &Reply) {
    let mut out = Vec::new();
    reply.write(&mut out);
    match reply.format {
        ReplyFormat::Json => {
            // Sent as a WebSocket text message and as one line on raw TCP.
            let text = std::str::from_utf8(&out).expect("a JSON reply is UTF-8");
            assert!(!text.contains('\n'), "a JSON reply spans lines: {text}");
            let value: Value =
                serde_json::from_str(text).unwrap_or_else(|e| panic!("reply {text} is not JSON: {e}"));
            let expected = if reply.status == Status::Ok {
                serde_json::json!({ "ack": reply.seq, "n": reply.n })
            } else {
                let mut v = serde_json::json!({ "error": reply.status.as_str(), "reason": reply.reason, "n": reply.n });
                if let Some(seq) = reply.seq {
                    v["seq"] = seq.into();
                }
                v
            };
            assert_eq!(value, expected, "JSON reply {text}");
        }
        ReplyFormat::Protobuf => {
            let ack = Ack::decode(&out[..]).expect("a protobuf reply decodes");
            assert_eq!(ack, reply.to_proto());
        }
    }
    let framing = match reply.format {
        ReplyFormat::Json => Framing::Lines,
        ReplyFormat::Protobuf => Framing::LengthPrefixed,
    };
    let mut framed = Vec::new();
    write_reply(framing, reply, &mut framed);
    let mut buf = BytesMut::from(&framed[..]);
    let mut framer = Framer::new(framing, out.len());
    assert_eq!(framer.decode(&mut buf), Ok(Some(Frame::Message(out.into()))), "the framed reply");
    assert!(buf.is_empty(), "bytes after the framed reply");
}
