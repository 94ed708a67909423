//! PUBLISH: an application message, with its topic, QoS and payload.

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::DecodeError;
use super::header::{read_packet_id, read_string, string_field_len, write_string, QoS};

/// An application message, in either direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Re-delivery of an earlier attempt (only with QoS 1 and 2).
    pub dup: bool,
    /// Delivery guarantee asked by the sender.
    pub qos: QoS,
    /// The server should keep this message as the topic's last known value.
    pub retain: bool,
    /// Topic name: non-empty, no wildcards.
    pub topic: String,
    /// Packet id, 0 for QoS 0 (not on the wire) and non-zero otherwise.
    pub pkid: u16,
    /// Message body. When decoded, a zero-copy slice of the read buffer: holding it keeps that
    /// buffer's allocation alive.
    pub payload: Bytes,
}

const DUP: u8 = 0b1000;
const RETAIN: u8 = 0b0001;

impl Publish {
    pub(crate) fn decode(flags: u8, mut body: Bytes) -> Result<Self, DecodeError> {
        let qos_bits = (flags >> 1) & 0b11;
        let qos = QoS::from_u8(qos_bits).ok_or(DecodeError::InvalidQoS(qos_bits))?;
        let topic = read_string(&mut body)?;
        validate_topic_name(&topic)?;
        let pkid = match qos {
            QoS::AtMostOnce => 0,
            QoS::AtLeastOnce | QoS::ExactlyOnce => read_packet_id(&mut body)?,
        };
        Ok(Publish { dup: flags & DUP != 0, qos, retain: flags & RETAIN != 0, topic, pkid, payload: body })
    }

    /// Low nibble of the first byte: DUP, QoS, RETAIN.
    pub(crate) fn header_flags(&self) -> u8 {
        let dup = if self.dup { DUP } else { 0 };
        let retain = if self.retain { RETAIN } else { 0 };
        dup | ((self.qos as u8) << 1) | retain
    }

    pub(crate) fn body_len(&self) -> usize {
        string_field_len(&self.topic) + self.pkid_len() + self.payload.len()
    }

    fn pkid_len(&self) -> usize {
        match self.qos {
            QoS::AtMostOnce => 0,
            QoS::AtLeastOnce | QoS::ExactlyOnce => 2,
        }
    }

    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        write_string(out, &self.topic);
        if self.pkid_len() > 0 {
            out.put_u16(self.pkid);
        }
        out.put_slice(&self.payload);
    }
}

/// A topic name (PUBLISH, will) is non-empty and has no wildcard [MQTT-3.3.2-2, 4.7.3-1].
pub(crate) fn validate_topic_name(topic: &str) -> Result<(), DecodeError> {
    if topic.is_empty() {
        return Err(DecodeError::ZeroLengthTopic);
    }
    if topic.contains(['+', '#']) {
        return Err(DecodeError::WildcardInTopic);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::codec::testing::*;
    use crate::mqtt::Packet;

    fn publish(qos: QoS, pkid: u16, payload: &'static [u8]) -> Packet {
        Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: "a/b".to_owned(),
            pkid,
            payload: Bytes::from_static(payload),
        })
    }

    #[test]
    fn qos0() {
        let bytes = [
            0x30, 0x07, // PUBLISH QoS 0, remaining length 7
            0x00, 0x03, b'a', b'/', b'b', // topic "a/b"
            b'h', b'i', // payload "hi", no packet id at QoS 0
        ];
        assert_fixture(&bytes, &publish(QoS::AtMostOnce, 0, b"hi"));
    }

    #[test]
    fn qos1_with_empty_payload() {
        let bytes = [
            0x32, 0x07, // PUBLISH QoS 1, remaining length 7
            0x00, 0x03, b'a', b'/', b'b', // topic "a/b"
            0x00, 0x0A, // packet id 10, then an empty payload
        ];
        assert_fixture(&bytes, &publish(QoS::AtLeastOnce, 10, b""));
    }

    #[test]
    fn qos2_dup_retain() {
        let bytes = [
            0x3D, 0x0A, // PUBLISH DUP, QoS 2, RETAIN, remaining length 10
            0x00, 0x03, b'a', b'/', b'b', // topic "a/b"
            0xFF, 0xFF, // packet id 65535
            b'x', b'y', b'z', // payload
        ];
        let expected = Packet::Publish(Publish {
            dup: true,
            qos: QoS::ExactlyOnce,
            retain: true,
            topic: "a/b".to_owned(),
            pkid: 0xFFFF,
            payload: Bytes::from_static(b"xyz"),
        });
        assert_fixture(&bytes, &expected);
    }

    #[test]
    fn large_payload_uses_a_three_byte_length() {
        let payload = vec![0xAB; 20_000];
        let packet = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "t".to_owned(),
            pkid: 0,
            payload: Bytes::from(payload),
        });
        let mut bytes = vec![
            0x30, // PUBLISH QoS 0
            0xA3, 0x9C, 0x01, // remaining length 20,003 = 0x23 + 0x1C * 128 + 1 * 16,384
            0x00, 0x01, b't', // topic "t"
        ];
        bytes.extend_from_slice(&[0xAB; 20_000]);
        assert_fixture(&bytes, &packet);
    }

    #[test]
    fn qos1_without_room_for_the_packet_id() {
        let bytes = [
            0x32, 0x06, // PUBLISH QoS 1, remaining length 6
            0x00, 0x03, b'a', b'/', b'b', // topic "a/b"
            0x00, // half a packet id
        ];
        assert_eq!(decode_bytes(&bytes), Err(DecodeError::Truncated));
    }

    #[test]
    fn topic_longer_than_the_body() {
        let bytes = [
            0x30, 0x04, // PUBLISH QoS 0, remaining length 4
            0x00, 0x09, b'a', b'b', // topic claims 9 bytes
        ];
        assert_eq!(decode_bytes(&bytes), Err(DecodeError::Truncated));
    }

    #[test]
    fn zero_packet_id() {
        let bytes = [
            0x32, 0x05, // PUBLISH QoS 1, remaining length 5
            0x00, 0x01, b't', // topic "t"
            0x00, 0x00, // packet id 0
        ];
        assert_eq!(decode_bytes(&bytes), Err(DecodeError::ZeroPacketId));
    }

    #[test]
    fn invalid_qos() {
        let bytes = [
            0x36, 0x03, // PUBLISH QoS 3
            0x00, 0x01, b't', // topic "t"
        ];
        assert_eq!(decode_bytes(&bytes), Err(DecodeError::InvalidQoS(3)));
    }

    #[test]
    fn dup_with_qos0() {
        let bytes = [
            0x38, 0x03, // PUBLISH DUP with QoS 0
            0x00, 0x01, b't', // topic "t"
        ];
        assert_eq!(
            decode_bytes(&bytes),
            Err(DecodeError::InvalidHeaderFlags { packet_type: 3, flags: 0b1000 })
        );
    }

    #[test]
    fn empty_topic() {
        let bytes = [
            0x30, 0x03, // PUBLISH QoS 0, remaining length 3
            0x00, 0x00, // empty topic
            b'x', // payload
        ];
        assert_eq!(decode_bytes(&bytes), Err(DecodeError::ZeroLengthTopic));
    }

    #[test]
    fn wildcard_topics() {
        for wildcard in [b'+', b'#'] {
            let bytes = [
                0x30, 0x05, // PUBLISH QoS 0, remaining length 5
                0x00, 0x03, b'a', b'/', wildcard, // topic "a/+" or "a/#"
            ];
            assert_eq!(decode_bytes(&bytes), Err(DecodeError::WildcardInTopic));
        }
    }

    #[test]
    fn topic_with_nul_or_bad_utf8() {
        for bad in [[b'a', 0x00], [0xC3, 0x28]] {
            let bytes = [
                0x30, 0x04, // PUBLISH QoS 0, remaining length 4
                0x00, 0x02, bad[0], bad[1], // "a\0", or an invalid 2-byte sequence
            ];
            assert_eq!(decode_bytes(&bytes), Err(DecodeError::InvalidUtf8));
        }
    }
}
