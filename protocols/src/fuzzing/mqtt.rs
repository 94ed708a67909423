//! MQTT decoding over arbitrary bytes, for one protocol version.
//!
//! Input: `[size, users, stream...]`. `size` 0 means no packet size limit, else the limit is
//! `16 × size` bytes; `users` is the cap on User Properties (255: none). The stream is decoded
//! as a connection would, all at once and again one byte at a time: both must give the same
//! packets and end the same way (a packet, "need more bytes" or the same error). Every packet
//! decoded must fit the limit, encode to at most the bytes it came from (inputs may use longer
//! forms: non-minimal lengths) and decode back to itself.

use bytes::BytesMut;

use super::Input;
use crate::mqtt::{encode, encoded_len, DecodeError, Decoder, Packet, ProtocolVersion};

pub fn mqtt_decode_v311(data: &[u8]) {
    decode_stream(ProtocolVersion::V311, data);
}

pub fn mqtt_decode_v5(data: &[u8]) {
    decode_stream(ProtocolVersion::V5, data);
}

/// The decoder an input's first two bytes describe.
pub(super) fn decoder(version: ProtocolVersion, size: u8, users: u8) -> Decoder {
    Decoder {
        version,
        max_packet_size: if size == 0 { usize::MAX } else { 16 * usize::from(size) },
        max_user_properties: if users == u8::MAX { usize::MAX } else { usize::from(users) },
    }
}

fn decode_stream(version: ProtocolVersion, data: &[u8]) {
    let mut input = Input::new(data);
    let decoder = decoder(version, input.u8(), input.u8());
    let stream = input.rest();
    let whole = decode_all(decoder, stream, stream.len());
    let bytewise = decode_all(decoder, stream, 1);
    assert_eq!(whole, bytewise, "decoding depends on how the bytes arrive");
    for (packet, consumed) in &whole.packets {
        check_round_trip(decoder, packet, *consumed);
    }
}

/// What a connection makes of a stream: its packets (with the bytes each took), then how it
/// stopped: needing more bytes (with the bytes buffered) or with an error.
#[derive(Debug, PartialEq)]
struct Decoded {
    packets: Vec<(Packet, usize)>,
    end: Result<usize, DecodeError>,
}

/// Decodes `stream` delivered in pieces of `chunk` bytes, until an error or the end.
fn decode_all(decoder: Decoder, stream: &[u8], chunk: usize) -> Decoded {
    let mut buf = BytesMut::new();
    let mut packets = Vec::new();
    for piece in stream.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match decoder.decode(&mut buf) {
                Ok(Some(packet)) => {
                    let consumed = before - buf.len();
                    assert!(
                        consumed <= decoder.max_packet_size,
                        "a {consumed}-byte packet passed the limit of {}",
                        decoder.max_packet_size
                    );
                    packets.push((packet, consumed));
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before, "\"need more bytes\" changed the buffer");
                    break;
                }
                Err(error) => return Decoded { packets, end: Err(error) },
            }
        }
    }
    Decoded { packets, end: Ok(buf.len()) }
}

/// `packet` (decoded from `consumed` bytes) encodes to at most that many bytes, exactly
/// `encoded_len` of them, and decodes from them to itself.
fn check_round_trip(decoder: Decoder, packet: &Packet, consumed: usize) {
    let mut out = BytesMut::new();
    encode(packet, &mut out);
    assert_eq!(out.len(), encoded_len(packet), "encoded_len disagrees with encode for {packet:?}");
    // Inputs may use longer forms (non-minimal lengths, acks with a Success reason code), so
    // the encoding is at most as long; except the one lenient short form, an MQTT 5 CONNACK
    // without property length, which is encoded with one.
    let lenient = usize::from(matches!(packet, Packet::ConnAckV5(_)));
    assert!(
        out.len() <= consumed + lenient,
        "{packet:?} re-encodes to {} bytes, decoded from {consumed}",
        out.len()
    );
    let unlimited = Decoder { max_packet_size: usize::MAX, ..decoder };
    assert_eq!(
        unlimited.decode(&mut out),
        Ok(Some(packet.clone())),
        "the re-encoded packet decodes differently"
    );
    assert!(out.is_empty(), "bytes left after decoding the re-encoded packet");
}
