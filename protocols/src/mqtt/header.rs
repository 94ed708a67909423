//! Wire primitives shared by every MQTT packet: protocol versions, fixed header, remaining
//! length, variable byte integers, u16s/u32s and strings.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::codec::DecodeError;

/// Quality of service of a PUBLISH, a will message or a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum QoS {
    /// Fire and forget: no acknowledgement.
    AtMostOnce = 0,
    /// Acknowledged by PUBACK; may be delivered twice.
    AtLeastOnce = 1,
    /// Four-step PUBREC/PUBREL/PUBCOMP handshake; delivered once.
    ExactlyOnce = 2,
}

impl QoS {
    /// Maps a wire value to a QoS; `None` for 3 and above.
    pub fn from_u8(value: u8) -> Option<QoS> {
        match value {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// The protocol a connection speaks, fixed by its CONNECT; it decides how later packets parse.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProtocolVersion {
    /// MQTT 3.1: protocol name "MQIsdp", level 3. Parsed like 3.1.1.
    V31,
    /// MQTT 3.1.1: protocol name "MQTT", level 4. Also how a connection parses before CONNECT.
    #[default]
    V311,
    /// MQTT 5.0: protocol name "MQTT", level 5: properties and reason codes.
    V5,
}

impl ProtocolVersion {
    /// The protocol level byte of CONNECT.
    pub fn level(self) -> u8 {
        match self {
            ProtocolVersion::V31 => 3,
            ProtocolVersion::V311 => 4,
            ProtocolVersion::V5 => 5,
        }
    }

    /// Whether packets carry MQTT 5 properties and reason codes.
    pub fn is_v5(self) -> bool {
        self == ProtocolVersion::V5
    }
}

pub(crate) const CONNECT: u8 = 1;
pub(crate) const CONNACK: u8 = 2;
pub(crate) const PUBLISH: u8 = 3;
pub(crate) const PUBACK: u8 = 4;
pub(crate) const PUBREC: u8 = 5;
pub(crate) const PUBREL: u8 = 6;
pub(crate) const PUBCOMP: u8 = 7;
pub(crate) const SUBSCRIBE: u8 = 8;
pub(crate) const SUBACK: u8 = 9;
pub(crate) const UNSUBSCRIBE: u8 = 10;
pub(crate) const UNSUBACK: u8 = 11;
pub(crate) const PINGREQ: u8 = 12;
pub(crate) const PINGRESP: u8 = 13;
pub(crate) const DISCONNECT: u8 = 14;
/// MQTT 5 only; reserved (invalid) in 3.1.1.
pub(crate) const AUTH: u8 = 15;

/// Header flags that PUBREL, SUBSCRIBE and UNSUBSCRIBE must carry (MQTT 3.1.1 §2.2.2).
pub(crate) const FLAGS_0010: u8 = 0b0010;

/// Largest value four remaining-length bytes can carry (256 MiB - 1); also the largest variable
/// byte integer (MQTT 5 §1.5.5).
pub(crate) const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Longest string or binary field: its length prefix is a u16.
const MAX_FIELD_LEN: usize = u16::MAX as usize;

/// The first two to five bytes of every packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FixedHeader {
    pub packet_type: u8,
    pub flags: u8,
    /// Bytes taken by the header itself: 1 + the remaining-length bytes.
    pub header_len: usize,
    /// Bytes of the body that follows the header.
    pub remaining_len: usize,
}

impl FixedHeader {
    /// Whole packet size, header included.
    pub fn packet_len(&self) -> usize {
        self.header_len + self.remaining_len
    }

    /// Parses the fixed header at the front of `buf`: `Ok(None)` while it is incomplete.
    ///
    /// Everything the header alone can prove wrong (type, flags, size above `max_packet_size`,
    /// body length of fixed-size packets) is reported here, before any of the body is needed,
    /// so that the caller never buffers a packet it will reject.
    pub fn parse(
        buf: &[u8],
        max_packet_size: usize,
        version: ProtocolVersion,
    ) -> Result<Option<Self>, DecodeError> {
        let Some((&first, length_bytes)) = buf.split_first() else {
            return Ok(None);
        };
        let packet_type = first >> 4;
        let flags = first & 0x0F;
        check_flags(packet_type, flags, version)?;

        let mut remaining_len = 0usize;
        for (index, &byte) in length_bytes.iter().take(4).enumerate() {
            remaining_len |= usize::from(byte & 0x7F) << (7 * index);
            if byte & 0x80 == 0 {
                let header = FixedHeader { packet_type, flags, header_len: index + 2, remaining_len };
                header.check_size(max_packet_size, version)?;
                return Ok(Some(header));
            }
            if index == 3 {
                return Err(DecodeError::MalformedRemainingLength);
            }
        }
        Ok(None)
    }

    fn check_size(&self, max_packet_size: usize, version: ProtocolVersion) -> Result<(), DecodeError> {
        let size = self.packet_len();
        if size > max_packet_size {
            return Err(DecodeError::PacketTooLarge { size, max: max_packet_size });
        }
        // MQTT 5 acks, CONNACK and DISCONNECT carry optional reason codes and properties: their
        // body decoders check the length.
        let expected = match (self.packet_type, version.is_v5()) {
            (CONNACK | PUBACK | PUBREC | PUBREL | PUBCOMP | UNSUBACK, false) => 2,
            (DISCONNECT, false) => 0,
            (PINGREQ | PINGRESP, _) => 0,
            _ => return Ok(()),
        };
        match self.remaining_len.cmp(&expected) {
            std::cmp::Ordering::Less => Err(DecodeError::Truncated),
            std::cmp::Ordering::Greater => Err(DecodeError::TrailingBytes),
            std::cmp::Ordering::Equal => Ok(()),
        }
    }
}

/// Checks the low nibble of the first byte against what the packet type allows (§2.2.2).
fn check_flags(packet_type: u8, flags: u8, version: ProtocolVersion) -> Result<(), DecodeError> {
    let expected = match packet_type {
        CONNECT | CONNACK | PUBACK | PUBREC | PUBCOMP | SUBACK | UNSUBACK | PINGREQ | PINGRESP
        | DISCONNECT => 0,
        AUTH if version.is_v5() => 0,
        PUBREL | SUBSCRIBE | UNSUBSCRIBE => FLAGS_0010,
        PUBLISH => {
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                return Err(DecodeError::InvalidQoS(qos));
            }
            // DUP must be 0 on QoS 0 messages [MQTT-3.3.1-2].
            if qos == 0 && flags & 0b1000 != 0 {
                return Err(DecodeError::InvalidHeaderFlags { packet_type, flags });
            }
            return Ok(());
        }
        _ => return Err(DecodeError::InvalidPacketType(packet_type)),
    };
    if flags == expected {
        Ok(())
    } else {
        Err(DecodeError::InvalidHeaderFlags { packet_type, flags })
    }
}

/// Number of bytes `write_remaining_length` uses for `len`.
pub(crate) fn remaining_length_len(len: usize) -> usize {
    match len {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Writes the variable-length remaining length. Values above 256 MiB cannot be represented and
/// are written as the maximum; callers keep packets under their size limit via `encoded_len`.
pub(crate) fn write_remaining_length(out: &mut BytesMut, len: usize) {
    let mut value = len.min(MAX_REMAINING_LENGTH);
    loop {
        let digit = (value & 0x7F) as u8;
        value >>= 7;
        if value == 0 {
            out.put_u8(digit);
            return;
        }
        out.put_u8(digit | 0x80);
    }
}

/// Number of bytes `write_variable_int` uses for `value`.
pub(crate) fn variable_int_len(value: usize) -> usize {
    remaining_length_len(value)
}

/// Writes a variable byte integer (the remaining-length encoding; MQTT 5 §1.5.5).
pub(crate) fn write_variable_int(out: &mut BytesMut, value: usize) {
    write_remaining_length(out, value);
}

/// Reads a variable byte integer of at most four bytes.
pub(crate) fn read_variable_int(buf: &mut Bytes) -> Result<usize, DecodeError> {
    let mut value = 0usize;
    for index in 0..4 {
        let byte = read_u8(buf)?;
        value |= usize::from(byte & 0x7F) << (7 * index);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(DecodeError::MalformedVariableInteger)
}

pub(crate) fn read_u32(buf: &mut Bytes) -> Result<u32, DecodeError> {
    if buf.len() < 4 {
        return Err(DecodeError::Truncated);
    }
    Ok(buf.get_u32())
}

pub(crate) fn read_u8(buf: &mut Bytes) -> Result<u8, DecodeError> {
    if buf.is_empty() {
        return Err(DecodeError::Truncated);
    }
    Ok(buf.get_u8())
}

pub(crate) fn read_u16(buf: &mut Bytes) -> Result<u16, DecodeError> {
    if buf.len() < 2 {
        return Err(DecodeError::Truncated);
    }
    Ok(buf.get_u16())
}

/// Reads a packet identifier, which must not be 0 [MQTT-2.3.1-1].
pub(crate) fn read_packet_id(buf: &mut Bytes) -> Result<u16, DecodeError> {
    match read_u16(buf)? {
        0 => Err(DecodeError::ZeroPacketId),
        pkid => Ok(pkid),
    }
}

/// Reads a u16-length-prefixed binary field, as a zero-copy slice of `buf`.
pub(crate) fn read_bytes(buf: &mut Bytes) -> Result<Bytes, DecodeError> {
    let len = usize::from(read_u16(buf)?);
    if buf.len() < len {
        return Err(DecodeError::Truncated);
    }
    Ok(buf.split_to(len))
}

/// Reads a u16-length-prefixed UTF-8 string: valid UTF-8 without U+0000 (§1.5.3).
pub(crate) fn read_string(buf: &mut Bytes) -> Result<String, DecodeError> {
    let raw = read_bytes(buf)?;
    let text = std::str::from_utf8(&raw).map_err(|_| DecodeError::InvalidUtf8)?;
    if text.contains('\0') {
        return Err(DecodeError::InvalidUtf8);
    }
    Ok(text.to_owned())
}

/// Fails with `TrailingBytes` if a fixed-layout body has bytes left after its last field.
pub(crate) fn expect_end(buf: &Bytes) -> Result<(), DecodeError> {
    if buf.is_empty() {
        Ok(())
    } else {
        Err(DecodeError::TrailingBytes)
    }
}

// Fields longer than a u16 prefix can describe are cut (strings at a char boundary) rather than
// written with a wrong length, so the stream stays well framed whatever the caller passes in.
fn clamp_bytes(bytes: &[u8]) -> &[u8] {
    &bytes[..bytes.len().min(MAX_FIELD_LEN)]
}

fn clamp_str(text: &str) -> &str {
    let mut end = text.len().min(MAX_FIELD_LEN);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Encoded size of a binary field: 2 length bytes + the data (cut at 65,535 bytes).
pub(crate) fn bytes_field_len(bytes: &[u8]) -> usize {
    2 + clamp_bytes(bytes).len()
}

/// Encoded size of a string field: 2 length bytes + the UTF-8 (cut at 65,535 bytes).
pub(crate) fn string_field_len(text: &str) -> usize {
    2 + clamp_str(text).len()
}

pub(crate) fn write_bytes(out: &mut BytesMut, bytes: &[u8]) {
    let bytes = clamp_bytes(bytes);
    out.put_u16(u16::try_from(bytes.len()).unwrap_or(u16::MAX));
    out.put_slice(bytes);
}

pub(crate) fn write_string(out: &mut BytesMut, text: &str) {
    write_bytes(out, clamp_str(text).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    fn parse(bytes: &[u8]) -> Result<Option<FixedHeader>, DecodeError> {
        FixedHeader::parse(bytes, usize::MAX, ProtocolVersion::V311)
    }

    fn parse_v5(bytes: &[u8]) -> Result<Option<FixedHeader>, DecodeError> {
        FixedHeader::parse(bytes, usize::MAX, ProtocolVersion::V5)
    }

    #[test]
    fn v5_bodies_of_acks_and_disconnect_are_checked_by_their_decoders() {
        // PUBACK with reason code and properties: remaining length 4 is fine in MQTT 5.
        assert_eq!(parse_v5(&[0x40, 0x04]).unwrap().unwrap().remaining_len, 4);
        // DISCONNECT with a reason code.
        assert_eq!(parse_v5(&[0xE0, 0x01]).unwrap().unwrap().remaining_len, 1);
        // PINGREQ is still empty.
        assert_eq!(parse_v5(&[0xC0, 0x01]), Err(DecodeError::TrailingBytes));
        // AUTH exists only in MQTT 5, with flags 0.
        assert_eq!(parse_v5(&[0xF0, 0x00]).unwrap().unwrap().packet_type, AUTH);
        assert_eq!(
            parse_v5(&[0xF1, 0x00]),
            Err(DecodeError::InvalidHeaderFlags { packet_type: AUTH, flags: 1 })
        );
    }

    #[test]
    fn variable_int_fixtures() {
        let mut one = Bytes::from_static(&[0x7F, 0xAA]); // 127, then another byte
        assert_eq!(read_variable_int(&mut one), Ok(127));
        assert_eq!(&one[..], &[0xAA]);
        let mut two = Bytes::from_static(&[0x80, 0x01]); // 0 + 1 * 128
        assert_eq!(read_variable_int(&mut two), Ok(128));
        let mut max = Bytes::from_static(&[0xFF, 0xFF, 0xFF, 0x7F]);
        assert_eq!(read_variable_int(&mut max), Ok(MAX_REMAINING_LENGTH));
        let mut five = Bytes::from_static(&[0xFF, 0xFF, 0xFF, 0xFF, 0x01]); // a fifth byte
        assert_eq!(read_variable_int(&mut five), Err(DecodeError::MalformedVariableInteger));
        let mut cut = Bytes::from_static(&[0x80]); // continues, then nothing
        assert_eq!(read_variable_int(&mut cut), Err(DecodeError::Truncated));
        let mut out = BytesMut::new();
        write_variable_int(&mut out, 16_384);
        assert_eq!(&out[..], &[0x80, 0x80, 0x01]);
        assert_eq!(variable_int_len(16_384), 3);
    }

    #[test]
    fn remaining_length_boundaries_round_trip() {
        for len in [0, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, MAX_REMAINING_LENGTH] {
            let mut out = BytesMut::new();
            out.put_u8(0x30); // PUBLISH QoS 0
            write_remaining_length(&mut out, len);
            assert_eq!(out.len(), 1 + remaining_length_len(len), "len {len}");
            let header = parse(&out).unwrap().unwrap();
            assert_eq!(header.remaining_len, len);
            assert_eq!(header.header_len, out.len());
        }
    }

    #[test]
    fn remaining_length_fixture() {
        let bytes = [
            0x30, // PUBLISH QoS 0
            0xC1, 0x02, // 0x41 + 0x02 * 128 = 321
        ];
        let header = parse(&bytes).unwrap().unwrap();
        assert_eq!(header.remaining_len, 321);
        assert_eq!(header.header_len, 3);
        assert_eq!(header.packet_len(), 324);
    }

    #[test]
    fn oversized_remaining_length_is_written_as_the_maximum() {
        let mut out = BytesMut::new();
        write_remaining_length(&mut out, usize::MAX);
        assert_eq!(&out[..], &[0xFF, 0xFF, 0xFF, 0x7F]);
        assert_eq!(remaining_length_len(usize::MAX), 4);
    }

    #[test]
    fn incomplete_header_needs_more_bytes() {
        assert_eq!(parse(&[]), Ok(None));
        assert_eq!(parse(&[0x30]), Ok(None)); // type byte only
        assert_eq!(parse(&[0x30, 0x80, 0x80]), Ok(None)); // length continues
    }

    #[test]
    fn fifth_length_byte_is_malformed() {
        let bytes = [
            0x30, // PUBLISH QoS 0
            0xFF, 0xFF, 0xFF, 0xFF, // fourth byte still says "continue"
        ];
        assert_eq!(parse(&bytes), Err(DecodeError::MalformedRemainingLength));
    }

    #[test]
    fn fixed_size_bodies_are_checked_from_the_header() {
        // PUBACK must have remaining length 2.
        assert_eq!(parse(&[0x40, 0x01]), Err(DecodeError::Truncated));
        assert_eq!(parse(&[0x40, 0x03]), Err(DecodeError::TrailingBytes));
        // PINGREQ must have remaining length 0.
        assert_eq!(parse(&[0xC0, 0x01]), Err(DecodeError::TrailingBytes));
    }

    #[test]
    fn flags_are_checked_per_type() {
        assert_eq!(
            parse(&[0x60, 0x02]), // PUBREL without its 0b0010 flags
            Err(DecodeError::InvalidHeaderFlags { packet_type: PUBREL, flags: 0 })
        );
        assert_eq!(
            parse(&[0x41, 0x02]), // PUBACK with flags 0b0001
            Err(DecodeError::InvalidHeaderFlags { packet_type: PUBACK, flags: 1 })
        );
        assert_eq!(parse(&[0x36]), Err(DecodeError::InvalidQoS(3))); // PUBLISH QoS 3
        assert_eq!(
            parse(&[0x38]), // PUBLISH QoS 0 with DUP
            Err(DecodeError::InvalidHeaderFlags { packet_type: PUBLISH, flags: 0b1000 })
        );
        assert_eq!(parse(&[0x00]), Err(DecodeError::InvalidPacketType(0)));
        assert_eq!(parse(&[0xF0]), Err(DecodeError::InvalidPacketType(15)));
    }

    #[test]
    fn qos_from_u8() {
        assert_eq!(QoS::from_u8(0), Some(QoS::AtMostOnce));
        assert_eq!(QoS::from_u8(1), Some(QoS::AtLeastOnce));
        assert_eq!(QoS::from_u8(2), Some(QoS::ExactlyOnce));
        assert_eq!(QoS::from_u8(3), None);
        assert_eq!(QoS::from_u8(0x80), None);
    }

    #[test]
    fn strings_must_be_utf8_without_nul() {
        let mut ok = Bytes::from_static(&[0x00, 0x02, 0xC3, 0xA9, 0xFF]); // "é", then 1 more byte
        assert_eq!(read_string(&mut ok).unwrap(), "é");
        assert_eq!(&ok[..], &[0xFF]);

        let mut invalid = Bytes::from_static(&[0x00, 0x01, 0xFF]); // lone 0xFF
        assert_eq!(read_string(&mut invalid), Err(DecodeError::InvalidUtf8));
        let mut nul = Bytes::from_static(&[0x00, 0x02, b'a', 0x00]); // "a\0"
        assert_eq!(read_string(&mut nul), Err(DecodeError::InvalidUtf8));
        let mut surrogate = Bytes::from_static(&[0x00, 0x03, 0xED, 0xA0, 0x80]); // U+D800
        assert_eq!(read_string(&mut surrogate), Err(DecodeError::InvalidUtf8));
        let mut short = Bytes::from_static(&[0x00, 0x05, b'a']); // claims 5, has 1
        assert_eq!(read_string(&mut short), Err(DecodeError::Truncated));
        let mut no_len = Bytes::from_static(&[0x00]); // half a length prefix
        assert_eq!(read_string(&mut no_len), Err(DecodeError::Truncated));
    }

    #[test]
    fn too_long_fields_are_cut_at_a_char_boundary() {
        let text = "é".repeat(40_000); // 80,000 bytes
        let mut out = BytesMut::new();
        write_string(&mut out, &text);
        assert_eq!(out.len(), string_field_len(&text));
        let mut written = out.freeze();
        let read = read_string(&mut written).unwrap();
        assert_eq!(read.len(), 65_534); // 32,767 whole "é"
        assert!(text.starts_with(&read));

        let bytes = vec![7u8; MAX];
        let mut out = BytesMut::new();
        write_bytes(&mut out, &bytes);
        assert_eq!(out.len(), bytes_field_len(&bytes));
        assert_eq!(out.len(), 2 + 65_535);
    }
}
