//! PUBACK, PUBREC, PUBREL, PUBCOMP and UNSUBACK: packets whose body is just a packet id.

use bytes::Bytes;

use super::codec::DecodeError;
use super::header::{expect_end, read_packet_id};

/// Body length of every packet-id-only packet.
pub(crate) const BODY_LEN: usize = 2;

/// Decodes the body of a packet-id-only packet: a non-zero u16 and nothing else.
pub(crate) fn decode_packet_id(mut body: Bytes) -> Result<u16, DecodeError> {
    let pkid = read_packet_id(&mut body)?;
    expect_end(&body)?;
    Ok(pkid)
}

#[cfg(test)]
mod tests {
    use crate::mqtt::codec::testing::*;
    use crate::mqtt::{DecodeError, Packet};

    #[test]
    fn fixtures() {
        let cases = [
            (0x40, Packet::PubAck(0x1234)),   // PUBACK
            (0x50, Packet::PubRec(0x1234)),   // PUBREC
            (0x62, Packet::PubRel(0x1234)),   // PUBREL, flags 0b0010
            (0x70, Packet::PubComp(0x1234)),  // PUBCOMP
            (0xB0, Packet::UnsubAck(0x1234)), // UNSUBACK
        ];
        for (first, packet) in cases {
            let bytes = [
                first, 0x02, // type and flags, remaining length 2
                0x12, 0x34, // packet id 0x1234
            ];
            assert_fixture(&bytes, &packet);
        }
    }

    #[test]
    fn zero_packet_id() {
        for first in [0x40, 0x50, 0x62, 0x70, 0xB0] {
            let bytes = [
                first, 0x02, // type and flags, remaining length 2
                0x00, 0x00, // packet id 0
            ];
            assert_eq!(decode_bytes(&bytes), Err(DecodeError::ZeroPacketId));
        }
    }

    #[test]
    fn wrong_body_length() {
        let short = [
            0x40, 0x01, // PUBACK, remaining length 1
            0x12, // half a packet id
        ];
        assert_eq!(decode_bytes(&short), Err(DecodeError::Truncated));
        let long = [
            0x40, 0x03, // PUBACK, remaining length 3
            0x12, 0x34, // packet id
            0x00, // one byte too many
        ];
        assert_eq!(decode_bytes(&long), Err(DecodeError::TrailingBytes));
    }

    #[test]
    fn pubrel_requires_flags_0010() {
        let bytes = [
            0x60, 0x02, // PUBREL with flags 0 instead of 0b0010
            0x00, 0x01, // packet id 1
        ];
        assert_eq!(decode_bytes(&bytes), Err(DecodeError::InvalidHeaderFlags { packet_type: 6, flags: 0 }));
    }

    #[test]
    fn next_packet_is_left_in_the_buffer() {
        let bytes = [
            0x40, 0x02, 0x00, 0x07, // PUBACK 7
            0x40, 0x02, 0x00, // first 3 bytes of PUBACK 8
        ];
        let mut buf = bytes::BytesMut::from(&bytes[..]);
        assert_eq!(crate::mqtt::decode(&mut buf, MAX), Ok(Some(Packet::PubAck(7))));
        assert_eq!(&buf[..], &[0x40, 0x02, 0x00]);
        assert_eq!(crate::mqtt::decode(&mut buf, MAX), Ok(None));
    }
}
