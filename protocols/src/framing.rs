//! Raw TCP framing: cuts a byte stream into device messages (u32 big-endian length prefix, or
//! newline-delimited JSON), recognises the hello that names the device, and frames replies.
//!
//! Pure: bytes in, frames out. "Need more bytes" is `Ok(None)`, and the frame size limit is
//! checked from the length prefix (or from the bytes scanned without finding a newline) before
//! the body is buffered, so an oversized frame is reported as soon as its size is known.

use std::fmt;

use bytes::{Buf, Bytes, BytesMut};
use prost::Message as _;
use serde::de::{Deserializer as _, IgnoredAny, MapAccess, Visitor};
use weir_proto::v1::device_payload::Body;
use weir_proto::DevicePayload;

use crate::payload::PayloadFormat;
use crate::reply::{Reply, ReplyFormat};

/// Bytes of the length prefix of a `length_prefixed` frame.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// Longest device id a hello may carry, in bytes (the payload decoders' default limit).
pub const MAX_DEVICE_ID_BYTES: usize = 256;

/// How a raw TCP stream is cut into messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// A u32 big-endian length `L`, then `L` bytes of protobuf `weir.v1.DevicePayload`;
    /// `L = 0` is a heartbeat. Replies: the same framing around a `weir.v1.Ack`.
    LengthPrefixed,
    /// One JSON message per line (`\n`, with an optional `\r` before it); blank lines are
    /// skipped. Replies: one JSON object per line.
    Lines,
}

impl Framing {
    /// How the messages of this framing are decoded.
    pub fn payload_format(self) -> PayloadFormat {
        match self {
            Framing::LengthPrefixed => PayloadFormat::Protobuf,
            Framing::Lines => PayloadFormat::Json,
        }
    }

    /// How replies on this framing are encoded.
    pub fn reply_format(self) -> ReplyFormat {
        match self {
            Framing::LengthPrefixed => ReplyFormat::Protobuf,
            Framing::Lines => ReplyFormat::Json,
        }
    }
}

/// One unit cut from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A zero-length `length_prefixed` frame: the device is alive; nothing to answer.
    Heartbeat,
    /// A message body: the bytes after the length prefix, or a line without its `\r\n`/`\n`.
    Message(Bytes),
}

/// Why the stream cannot be cut further. The connection answers (when it can) and closes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A frame longer than the limit. For `lines`, `len` is the line's length when its newline
    /// was seen, or else the bytes received so far without one (the line is at least that long).
    #[error("frame of {len} bytes is larger than the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// The stream ended inside a `length_prefixed` frame (at end of stream only).
    #[error("stream ended inside a frame ({buffered} bytes of it received)")]
    Truncated { buffered: usize },
}

/// Cuts frames off the front of a buffer that the caller appends received bytes to.
///
/// Between calls the caller may only append to the buffer (a `lines` framer remembers how far
/// it has already looked for a newline).
#[derive(Debug, Clone)]
pub struct Framer {
    framing: Framing,
    max_frame_bytes: usize,
    /// `lines`: bytes at the front of the buffer already known to hold no newline.
    scanned: usize,
}

impl Framer {
    /// A framer refusing frames longer than `max_frame_bytes` (prefix and newline not counted).
    pub fn new(framing: Framing, max_frame_bytes: usize) -> Self {
        Self { framing, max_frame_bytes, scanned: 0 }
    }

    /// The framing this framer cuts.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// The next frame at the front of `buf`, removing it; `Ok(None)` when more bytes are needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.framing {
            Framing::LengthPrefixed => self.decode_length_prefixed(buf),
            Framing::Lines => self.decode_line(buf),
        }
    }

    /// What is left in `buf` once the stream has ended (call after `decode` returned `None`):
    /// a last line without its newline is a message; part of a `length_prefixed` frame is
    /// `Truncated`.
    pub fn finish(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        self.scanned = 0;
        if buf.is_empty() {
            return Ok(None);
        }
        match self.framing {
            Framing::LengthPrefixed => Err(FrameError::Truncated { buffered: buf.len() }),
            Framing::Lines => {
                let line = buf.split().freeze();
                let end = line_end(&line, line.len());
                Ok(line_message(line, end))
            }
        }
    }

    fn decode_length_prefixed(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Some(prefix) = buf.get(..LENGTH_PREFIX_BYTES) else { return Ok(None) };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len > self.max_frame_bytes {
            return Err(FrameError::TooLarge { len, max: self.max_frame_bytes });
        }
        if buf.len() - LENGTH_PREFIX_BYTES < len {
            return Ok(None);
        }
        buf.advance(LENGTH_PREFIX_BYTES);
        if len == 0 {
            return Ok(Some(Frame::Heartbeat));
        }
        Ok(Some(Frame::Message(buf.split_to(len).freeze())))
    }

    fn decode_line(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        loop {
            let from = self.scanned.min(buf.len());
            let Some(newline) = buf[from..].iter().position(|&b| b == b'\n').map(|i| from + i) else {
                self.scanned = buf.len();
                // A trailing `\r` may be the first half of the line's `\r\n`.
                let known = line_end(buf, buf.len());
                if known > self.max_frame_bytes {
                    return Err(FrameError::TooLarge { len: known, max: self.max_frame_bytes });
                }
                return Ok(None);
            };
            self.scanned = 0;
            let end = line_end(buf, newline);
            if end > self.max_frame_bytes {
                return Err(FrameError::TooLarge { len: end, max: self.max_frame_bytes });
            }
            let line = buf.split_to(newline + 1).freeze();
            if let Some(frame) = line_message(line, end) {
                return Ok(Some(frame));
            }
        }
    }
}

/// The message in `line[..end]`, or `None` for a blank line.
fn line_message(line: Bytes, end: usize) -> Option<Frame> {
    if line[..end].iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    Some(Frame::Message(line.slice(..end)))
}

/// Where the line content in `bytes[..newline]` ends: before a `\r` right before the newline.
fn line_end(bytes: &[u8], newline: usize) -> usize {
    if newline > 0 && bytes[newline - 1] == b'\r' {
        newline - 1
    } else {
        newline
    }
}

/// Appends `payload` as one frame: length-prefixed, or as a line (the payload must not contain
/// a newline; compact JSON never does).
///
/// # Panics
/// When a `length_prefixed` payload is longer than `u32::MAX` bytes.
pub fn encode_frame(framing: Framing, payload: &[u8], out: &mut Vec<u8>) {
    match framing {
        Framing::LengthPrefixed => {
            let len = u32::try_from(payload.len()).expect("frame longer than u32::MAX bytes");
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(payload);
        }
        Framing::Lines => {
            out.extend_from_slice(payload);
            out.push(b'\n');
        }
    }
}

/// Appends `reply` as one frame of `framing` (encoded in the reply's own format, which a
/// connection sets from [`Framing::reply_format`]).
pub fn write_reply(framing: Framing, reply: &Reply, out: &mut Vec<u8>) {
    match framing {
        Framing::LengthPrefixed => {
            let start = out.len();
            out.extend_from_slice(&[0; LENGTH_PREFIX_BYTES]);
            reply.write(out);
            // An Ack is a few dozen bytes plus its reason, far below u32::MAX.
            let len = (out.len() - start - LENGTH_PREFIX_BYTES) as u32;
            out[start..start + LENGTH_PREFIX_BYTES].copy_from_slice(&len.to_be_bytes());
        }
        Framing::Lines => {
            reply.write(out);
            out.push(b'\n');
        }
    }
}

/// A hello that names a device id weir will not accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("the device id is empty")]
    Empty,
    #[error("the device id is {len} bytes, more than the limit of {max}")]
    TooLong { len: usize, max: usize },
    #[error("the device id contains an MQTT wildcard ('#' or '+')")]
    Wildcard,
    #[error("the device id contains a control character")]
    ControlCharacter,
    #[error("the device id must be a JSON string")]
    NotAString,
}

/// Whether `frame` is a hello, and the device id it names.
///
/// `length_prefixed`: a `DevicePayload` whose body is `hello`. `lines`: exactly the object
/// `{"hello":"<id>"}` (whitespace allowed, the key spelled literally, no other key). `Ok(None)`:
/// not a hello (an ordinary message, or bytes that do not decode, which the payload decoder will
/// explain). `Err`: a hello whose device id is refused.
pub fn parse_hello(framing: Framing, frame: &[u8]) -> Result<Option<String>, HelloError> {
    match framing {
        Framing::LengthPrefixed => match DevicePayload::decode(frame) {
            Ok(DevicePayload { body: Some(Body::Hello(hello)) }) => {
                check_device_id(&hello.device_id)?;
                Ok(Some(hello.device_id))
            }
            _ => Ok(None),
        },
        Framing::Lines => {
            if !starts_like_hello(frame) {
                return Ok(None);
            }
            let mut parser = serde_json::Deserializer::from_slice(frame);
            let value = match parser.deserialize_map(HelloVisitor).and_then(|v| parser.end().map(|()| v)) {
                Ok(Some(value)) => value,
                Ok(None) | Err(_) => return Ok(None),
            };
            let serde_json::Value::String(device_id) = value else { return Err(HelloError::NotAString) };
            check_device_id(&device_id)?;
            Ok(Some(device_id))
        }
    }
}

/// Cheap test every line can afford: `{`, then the key `"hello"`, whitespace allowed.
fn starts_like_hello(frame: &[u8]) -> bool {
    let mut rest = frame.trim_ascii_start();
    let Some(after_brace) = rest.strip_prefix(b"{") else { return false };
    rest = after_brace.trim_ascii_start();
    rest.starts_with(b"\"hello\"")
}

/// Checks a device id a connection names (hello, WebSocket URL or header): 1..=256 bytes, no
/// MQTT wildcard, no control character.
pub fn check_device_id(device_id: &str) -> Result<(), HelloError> {
    if device_id.is_empty() {
        return Err(HelloError::Empty);
    }
    if device_id.len() > MAX_DEVICE_ID_BYTES {
        return Err(HelloError::TooLong { len: device_id.len(), max: MAX_DEVICE_ID_BYTES });
    }
    if device_id.contains(['#', '+']) {
        return Err(HelloError::Wildcard);
    }
    if device_id.chars().any(char::is_control) {
        return Err(HelloError::ControlCharacter);
    }
    Ok(())
}

/// The value of the only key `hello` of a JSON object; `None` for any other object.
struct HelloVisitor;

impl<'de> Visitor<'de> for HelloVisitor {
    type Value = Option<serde_json::Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(r#"{"hello":"<device id>"}"#)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut hello = None;
        let mut other_keys = false;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == "hello" && hello.is_none() {
                hello = Some(map.next_value::<serde_json::Value>()?);
            } else {
                // Another key, or `hello` twice: not the hello form.
                other_keys = true;
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(hello.filter(|_| !other_keys))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::Status;
    use weir_proto::v1::Hello;
    use weir_proto::{Ack, AckStatus};

    fn lp(max: usize) -> Framer {
        Framer::new(Framing::LengthPrefixed, max)
    }

    fn lines(max: usize) -> Framer {
        Framer::new(Framing::Lines, max)
    }

    fn message(bytes: &[u8]) -> Option<Frame> {
        Some(Frame::Message(Bytes::copy_from_slice(bytes)))
    }

    #[test]
    fn length_prefixed_frame_leaves_trailing_bytes() {
        let mut buf = BytesMut::from(
            &[
                0x00, 0x00, 0x00, 0x03, // length 3
                0x0a, 0x01, 0x00, //       body: 3 bytes
                0x00, 0x00, //             trailing: half of the next frame's prefix
            ][..],
        );
        let mut framer = lp(64);
        assert_eq!(framer.decode(&mut buf), Ok(message(&[0x0a, 0x01, 0x00])));
        assert_eq!(&buf[..], &[0x00, 0x00]);
        assert_eq!(framer.decode(&mut buf), Ok(None));
        assert_eq!(&buf[..], &[0x00, 0x00], "need-more leaves the buffer as it was");
    }

    #[test]
    fn length_prefixed_waits_for_the_whole_body() {
        let mut buf = BytesMut::from(
            &[
                0x00, 0x00, 0x00, 0x05, // length 5
                0x01, 0x02, 0x03, //       only 3 bytes of the body so far
            ][..],
        );
        let mut framer = lp(64);
        assert_eq!(framer.decode(&mut buf), Ok(None));
        buf.extend_from_slice(&[
            0x04, 0x05, //             the rest of the body
            0x00, 0x00, 0x00, 0x00, // a heartbeat
            0xff, //                   trailing: first byte of a prefix
        ]);
        assert_eq!(framer.decode(&mut buf), Ok(message(&[1, 2, 3, 4, 5])));
        assert_eq!(framer.decode(&mut buf), Ok(Some(Frame::Heartbeat)));
        assert_eq!(framer.decode(&mut buf), Ok(None));
        assert_eq!(&buf[..], &[0xff]);
        assert_eq!(framer.finish(&mut buf), Err(FrameError::Truncated { buffered: 1 }));
    }

    #[test]
    fn length_prefix_over_the_limit_is_refused_before_the_body_arrives() {
        let mut buf = BytesMut::from(
            &[
                0x00, 0x00, 0x01, 0x00, // length 256
                0xaa, //                   first body byte; the other 255 never need to arrive
            ][..],
        );
        assert_eq!(lp(255).decode(&mut buf), Err(FrameError::TooLarge { len: 256, max: 255 }));
        let mut huge = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]); // length 4 GiB - 1
        assert_eq!(
            lp(1 << 20).decode(&mut huge),
            Err(FrameError::TooLarge { len: u32::MAX as usize, max: 1 << 20 })
        );
        // Exactly the limit is fine.
        let mut buf = BytesMut::from(&[0x00, 0x00, 0x00, 0x02, b'o', b'k'][..]);
        assert_eq!(lp(2).decode(&mut buf), Ok(message(b"ok")));
    }

    #[test]
    fn lines_strip_the_terminator_and_skip_blank_lines() {
        let mut buf = BytesMut::from(
            &b"{\"a\":1}\r\n\
               \n\
               \r\n\
               \t \n\
               [1]\n\
               {\"b\"" // trailing: a line still arriving
            [..],
        );
        let mut framer = lines(64);
        assert_eq!(framer.decode(&mut buf), Ok(message(b"{\"a\":1}")));
        assert_eq!(framer.decode(&mut buf), Ok(message(b"[1]")));
        assert_eq!(framer.decode(&mut buf), Ok(None));
        assert_eq!(&buf[..], b"{\"b\"");
        buf.extend_from_slice(b":2}\n");
        assert_eq!(framer.decode(&mut buf), Ok(message(b"{\"b\":2}")));
        assert!(buf.is_empty());
    }

    #[test]
    fn a_line_over_the_limit_is_refused_before_its_newline_arrives() {
        let mut framer = lines(4);
        let mut buf = BytesMut::from(&b"abcd"[..]); // 4 bytes, no newline yet: still fine
        assert_eq!(framer.decode(&mut buf), Ok(None));
        buf.extend_from_slice(b"\r"); // may be the \r of \r\n: still fine
        assert_eq!(framer.decode(&mut buf), Ok(None));
        buf.extend_from_slice(b"\n"); // exactly 4 bytes of content
        assert_eq!(framer.decode(&mut buf), Ok(message(b"abcd")));
        let mut buf = BytesMut::from(&b"abcde"[..]); // a fifth byte without a newline
        assert_eq!(framer.decode(&mut buf), Err(FrameError::TooLarge { len: 5, max: 4 }));
        let mut buf = BytesMut::from(&b"abcde\n{}\n"[..]); // too long with its newline
        assert_eq!(lines(4).decode(&mut buf), Err(FrameError::TooLarge { len: 5, max: 4 }));
        let mut buf = BytesMut::from(&b"abcd\r\r\n"[..]); // only the last \r is the terminator's
        assert_eq!(lines(4).decode(&mut buf), Err(FrameError::TooLarge { len: 5, max: 4 }));
    }

    #[test]
    fn the_last_line_may_end_with_the_stream() {
        let mut framer = lines(64);
        let mut buf = BytesMut::from(&b"{}\n{\"x\":1}\r"[..]);
        assert_eq!(framer.decode(&mut buf), Ok(message(b"{}")));
        assert_eq!(framer.decode(&mut buf), Ok(None));
        assert_eq!(framer.finish(&mut buf), Ok(message(b"{\"x\":1}")));
        let mut blank = BytesMut::from(&b" \r"[..]);
        assert_eq!(framer.finish(&mut blank), Ok(None));
    }

    #[test]
    fn hello_in_protobuf() {
        let hello = DevicePayload { body: Some(Body::Hello(Hello { device_id: "dev-1".into() })) };
        let bytes = hello.encode_to_vec();
        assert_eq!(
            bytes,
            [
                0x1a, 0x07, //             field 3 (hello), 7 bytes
                0x0a, 0x05, //             field 1 (device_id), 5 bytes
                b'd', b'e', b'v', b'-', b'1',
            ]
        );
        assert_eq!(parse_hello(Framing::LengthPrefixed, &bytes), Ok(Some("dev-1".into())));
        let reading = DevicePayload { body: Some(Body::Reading(Default::default())) }.encode_to_vec();
        assert_eq!(parse_hello(Framing::LengthPrefixed, &reading), Ok(None));
        assert_eq!(parse_hello(Framing::LengthPrefixed, b"\xff\xff"), Ok(None), "undecodable: not a hello");
        let wildcard = DevicePayload { body: Some(Body::Hello(Hello { device_id: "a/#".into() })) };
        assert_eq!(
            parse_hello(Framing::LengthPrefixed, &wildcard.encode_to_vec()),
            Err(HelloError::Wildcard)
        );
        let empty = DevicePayload { body: Some(Body::Hello(Hello::default())) };
        assert_eq!(parse_hello(Framing::LengthPrefixed, &empty.encode_to_vec()), Err(HelloError::Empty));
    }

    #[test]
    fn hello_in_json_is_exactly_one_key() {
        let hello = |line: &str| parse_hello(Framing::Lines, line.as_bytes());
        assert_eq!(hello(r#"{"hello":"device-1"}"#), Ok(Some("device-1".into())));
        assert_eq!(hello(r#" { "hello" : "d\u00e9v" } "#), Ok(Some("dév".into())));
        assert_eq!(hello(r#"{"hello":"d1","seq":1}"#), Ok(None), "a reading with a metric named hello");
        assert_eq!(hello(r#"{"hello":"d1","hello":"d2"}"#), Ok(None));
        assert_eq!(hello(r#"{"seq":1,"hello":"d1"}"#), Ok(None));
        assert_eq!(hello(r#"[{"hello":"d1"}]"#), Ok(None));
        assert_eq!(hello(r#"{"hello":"d1"} x"#), Ok(None), "trailing bytes: not JSON");
        assert_eq!(hello(r#"{"hello":"d1""#), Ok(None));
        assert_eq!(hello(r#"{"hello":""}"#), Err(HelloError::Empty));
        assert_eq!(hello(r#"{"hello":7}"#), Err(HelloError::NotAString));
        assert_eq!(hello(r#"{"hello":null}"#), Err(HelloError::NotAString));
        assert_eq!(hello(r#"{"hello":"a+b"}"#), Err(HelloError::Wildcard));
        assert_eq!(hello(r#"{"hello":"a#"}"#), Err(HelloError::Wildcard));
        assert_eq!(hello(r#"{"hello":"a\nb"}"#), Err(HelloError::ControlCharacter));
        assert_eq!(hello(r#"{"hello":"a\u0000"}"#), Err(HelloError::ControlCharacter));
        let long = format!(r#"{{"hello":"{}"}}"#, "x".repeat(257));
        assert_eq!(hello(&long), Err(HelloError::TooLong { len: 257, max: 256 }));
        let longest = format!(r#"{{"hello":"{}"}}"#, "x".repeat(256));
        assert_eq!(hello(&longest).map(|id| id.map(|id| id.len())), Ok(Some(256)));
    }

    #[test]
    fn replies_are_framed_per_framing() {
        let reply = Reply {
            n: 3,
            seq: Some(7),
            status: Status::Ok,
            reason: String::new(),
            format: ReplyFormat::Json,
        };
        let mut out = Vec::new();
        write_reply(Framing::Lines, &reply, &mut out);
        write_reply(Framing::Lines, &Reply { n: 4, seq: None, ..reply.clone() }, &mut out);
        assert_eq!(out, b"{\"ack\":7,\"n\":3}\n{\"ack\":null,\"n\":4}\n");

        let refused = Reply {
            n: 1,
            seq: None,
            status: Status::TooLarge,
            reason: "big".into(),
            format: ReplyFormat::Protobuf,
        };
        let mut out = Vec::new();
        write_reply(Framing::LengthPrefixed, &refused, &mut out);
        assert_eq!(
            out,
            [
                0x00, 0x00, 0x00, 0x09, // length 9
                0x10, 0x02, //             status = TOO_LARGE
                0x1a, 0x03, b'b', b'i', b'g', // reason "big"
                0x20, 0x01, //             n = 1
            ]
        );
        let mut buf = BytesMut::from(&out[..]);
        let Ok(Some(Frame::Message(body))) = lp(64).decode(&mut buf) else { panic!("one reply frame") };
        let ack = Ack::decode(body).unwrap();
        assert_eq!((ack.status(), ack.n, ack.seq), (AckStatus::TooLarge, 1, None));
    }
}

#[cfg(test)]
mod proptests {
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;

    /// Every frame of `stream`, fed in two parts split at `at`, until need-more; then the end.
    fn cut(framer: &mut Framer, stream: &[u8], at: usize) -> Result<Vec<Frame>, FrameError> {
        let mut buf = BytesMut::from(&stream[..at]);
        let mut frames = Vec::new();
        while let Some(frame) = framer.decode(&mut buf)? {
            frames.push(frame);
        }
        buf.extend_from_slice(&stream[at..]);
        while let Some(frame) = framer.decode(&mut buf)? {
            frames.push(frame);
        }
        frames.extend(framer.finish(&mut buf)?);
        Ok(frames)
    }

    /// What the receiver should see for a message: a heartbeat for an empty length-prefixed one.
    fn expected(framing: Framing, payloads: &[Vec<u8>]) -> Vec<Frame> {
        payloads
            .iter()
            .map(|p| match framing {
                Framing::LengthPrefixed if p.is_empty() => Frame::Heartbeat,
                _ => Frame::Message(Bytes::copy_from_slice(p)),
            })
            .collect()
    }

    /// A line's content: no newline, not blank, not ending in `\r`.
    fn line() -> impl Strategy<Value = Vec<u8>> {
        (vec(any::<u8>().prop_filter("no newline", |b| *b != b'\n'), 0..40), 0x21u8..0x7f).prop_map(
            |(mut bytes, last)| {
                bytes.push(last);
                bytes
            },
        )
    }

    proptest! {
        #[test]
        fn length_prefixed_round_trips_at_every_split(payloads in vec(vec(any::<u8>(), 0..40), 0..8)) {
            let mut stream = Vec::new();
            for p in &payloads {
                encode_frame(Framing::LengthPrefixed, p, &mut stream);
            }
            let want = expected(Framing::LengthPrefixed, &payloads);
            for at in 0..=stream.len() {
                let got = cut(&mut Framer::new(Framing::LengthPrefixed, 40), &stream, at);
                prop_assert_eq!(got.as_ref(), Ok(&want), "split at {}", at);
            }
        }

        #[test]
        fn lines_round_trip_at_every_split(
            payloads in vec(line(), 0..8),
            crlf in vec(any::<bool>(), 8),
            blank in vec(0usize..3, 8),
            last_newline in any::<bool>(),
        ) {
            let mut stream = Vec::new();
            for (i, p) in payloads.iter().enumerate() {
                stream.extend(std::iter::repeat_n(b'\n', blank[i]));
                stream.extend_from_slice(p);
                if crlf[i] {
                    stream.push(b'\r');
                }
                if last_newline || i + 1 < payloads.len() {
                    stream.push(b'\n');
                }
            }
            let want = expected(Framing::Lines, &payloads);
            for at in 0..=stream.len() {
                let got = cut(&mut Framer::new(Framing::Lines, 41), &stream, at);
                prop_assert_eq!(got.as_ref(), Ok(&want), "split at {}", at);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_never_exceed_the_limit(
            stream in vec(any::<u8>(), 0..300),
            max in 0usize..80,
            chunk in 1usize..50,
        ) {
            for framing in [Framing::LengthPrefixed, Framing::Lines] {
                let mut framer = Framer::new(framing, max);
                let mut buf = BytesMut::new();
                'feed: for piece in stream.chunks(chunk) {
                    buf.extend_from_slice(piece);
                    loop {
                        match framer.decode(&mut buf) {
                            Ok(Some(Frame::Message(body))) => {
                                prop_assert!(body.len() <= max);
                                let _ = parse_hello(framing, &body);
                            }
                            Ok(Some(Frame::Heartbeat)) => {}
                            Ok(None) => break,
                            Err(FrameError::TooLarge { len, max: limit }) => {
                                prop_assert!(len > limit);
                                break 'feed;
                            }
                            Err(other) => prop_assert!(false, "{other}"),
                        }
                    }
                }
                let _ = framer.finish(&mut buf);
                let _ = parse_hello(framing, &stream);
            }
        }

        #[test]
        fn a_length_over_the_limit_is_refused_from_its_prefix_alone(len in 1u32.., max in 0usize..1 << 16) {
            prop_assume!(len as usize > max);
            let mut buf = BytesMut::from(&len.to_be_bytes()[..]);
            prop_assert_eq!(
                Framer::new(Framing::LengthPrefixed, max).decode(&mut buf),
                Err(FrameError::TooLarge { len: len as usize, max })
            );
        }
    }
}
