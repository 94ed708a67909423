//! PUBACK, PUBREC, PUBREL, PUBCOMP and UNSUBACK: in 3.1.1 packets whose body is just a packet
//! id; in MQTT 5 the four publish acks add an optional reason code and properties.

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::DecodeError;
use super::header::{expect_end, read_packet_id};
use super::properties::{Properties, PropertyContext};
use super::reason::{decode_reason_tail, encode_reason_tail, reason_tail_len, ReasonCode};

/// An MQTT 5 PUBACK, PUBREC, PUBREL or PUBCOMP. Encoded in its shortest form: the packet id
/// alone for Success without properties (the same 4 bytes as 3.1.1), the reason code without a
/// property length when there are no properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckV5 {
    /// Packet id of the PUBLISH (or PUBREC/PUBREL) being answered.
    pub pkid: u16,
    /// Success (0x00), or why the message was not accepted (0x80 and above; for PUBREC it also
    /// ends the QoS 2 exchange).
    pub reason: ReasonCode,
    /// Reason String and User Properties.
    pub properties: Properties,
}

impl AckV5 {
    /// A Success ack without properties.
    pub fn success(pkid: u16) -> Self {
        Self { pkid, reason: ReasonCode::Success, properties: Properties::default() }
    }

    pub(crate) fn decode(mut body: Bytes, max_user_properties: usize) -> Result<Self, DecodeError> {
        let pkid = read_packet_id(&mut body)?;
        let (reason, properties) = decode_reason_tail(body, PropertyContext::Ack, max_user_properties)?;
        Ok(AckV5 { pkid, reason, properties })
    }

    pub(crate) fn body_len(&self) -> usize {
        2 + reason_tail_len(self.reason, &self.properties)
    }

    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        out.put_u16(self.pkid);
        encode_reason_tail(self.reason, &self.properties, out);
    }
}

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
    use crate::mqtt::{AckV5, DecodeError, Decoder, Packet, Properties, ProtocolVersion, ReasonCode};

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

    fn decode_v5(bytes: &[u8]) -> Result<Option<Packet>, DecodeError> {
        Decoder::new(ProtocolVersion::V5, MAX).decode(&mut bytes::BytesMut::from(bytes))
    }

    #[test]
    fn v5_short_success_form_is_the_3_1_1_bytes() {
        let cases = [
            (0x40, Packet::PubAckV5(AckV5::success(0x1234))),  // PUBACK
            (0x50, Packet::PubRecV5(AckV5::success(0x1234))),  // PUBREC
            (0x62, Packet::PubRelV5(AckV5::success(0x1234))),  // PUBREL, flags 0b0010
            (0x70, Packet::PubCompV5(AckV5::success(0x1234))), // PUBCOMP
        ];
        for (first, packet) in cases {
            let bytes = [
                first, 0x02, // type and flags, remaining length 2
                0x12, 0x34, // packet id 0x1234; reason code Success and no properties implied
            ];
            assert_fixture_v5(&bytes, &packet);
        }
    }

    #[test]
    fn v5_reason_code_without_properties() {
        let bytes = [
            0x40, 0x03, // PUBACK, remaining length 3
            0x00, 0x09, // packet id 9
            0x99, // payload format invalid; no property length
        ];
        let ack =
            AckV5 { pkid: 9, reason: ReasonCode::PayloadFormatInvalid, properties: Properties::default() };
        assert_fixture_v5(&bytes, &Packet::PubAckV5(ack));
    }

    #[test]
    fn v5_reason_code_and_reason_string() {
        let bytes = [
            0x50, 0x0A, // PUBREC, remaining length 10
            0x00, 0x09, // packet id 9
            0x97, // quota exceeded
            0x06, // properties: 6 bytes
            0x1F, 0x00, 0x03, b'f', b'u', b'l', // reason string "ful"
            0x40, // trailing marker, checked below
        ];
        let ack = AckV5 {
            pkid: 9,
            reason: ReasonCode::QuotaExceeded,
            properties: Properties { reason_string: Some("ful".into()), ..Properties::default() },
        };
        assert_fixture_v5(&bytes[..12], &Packet::PubRecV5(ack));
        let mut too_long = bytes.to_vec();
        too_long[1] = 0x0B; // remaining length 11 takes in the marker
        assert_eq!(decode_v5(&too_long), Err(DecodeError::TrailingBytes));
    }

    #[test]
    fn v5_non_canonical_forms_decode() {
        // Success spelled out, with an empty property list: decodes as the short form.
        let long = [
            0x40, 0x04, // PUBACK, remaining length 4
            0x00, 0x01, // packet id 1
            0x00, // success
            0x00, // no properties
        ];
        assert_eq!(decode_v5(&long), Ok(Some(Packet::PubAckV5(AckV5::success(1)))));
        let bad_code = [
            0x40, 0x03, // PUBACK, remaining length 3
            0x00, 0x01, // packet id 1
            0x05, // not a reason code
        ];
        assert_eq!(decode_v5(&bad_code), Err(DecodeError::InvalidReasonCode(5)));
        let short = [
            0x40, 0x01, // PUBACK, remaining length 1
            0x00, // half a packet id
        ];
        assert_eq!(decode_v5(&short), Err(DecodeError::Truncated));
    }
}
