//! PUBLISH: an application message, with its topic, QoS and payload (and, in MQTT 5, its
//! properties: topic alias, payload format, content type, user properties, ...).

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::DecodeError;
use super::header::{read_packet_id, read_string, string_field_len, write_string, QoS};
use super::properties::{Properties, PropertyContext};

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

/// An MQTT 5 application message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishV5 {
    /// The fields MQTT 5 shares with 3.1.1. `topic` may be empty when `properties.topic_alias`
    /// is set: the topic is then the one the alias was last given.
    pub publish: Publish,
    /// PUBLISH properties.
    pub properties: Properties,
}

const DUP: u8 = 0b1000;
const RETAIN: u8 = 0b0001;

impl Publish {
    pub(crate) fn decode(flags: u8, mut body: Bytes) -> Result<Self, DecodeError> {
        let publish = Self::decode_head(flags, &mut body)?;
        validate_topic_name(&publish.topic)?;
        Ok(Publish { payload: body, ..publish })
    }

    /// Reads the flags, topic (not yet validated) and packet id; the payload is left empty.
    fn decode_head(flags: u8, body: &mut Bytes) -> Result<Self, DecodeError> {
        let qos_bits = (flags >> 1) & 0b11;
        let qos = QoS::from_u8(qos_bits).ok_or(DecodeError::InvalidQoS(qos_bits))?;
        let topic = read_string(body)?;
        let pkid = match qos {
            QoS::AtMostOnce => 0,
            QoS::AtLeastOnce | QoS::ExactlyOnce => read_packet_id(body)?,
        };
        Ok(Publish {
            dup: flags & DUP != 0,
            qos,
            retain: flags & RETAIN != 0,
            topic,
            pkid,
            payload: Bytes::new(),
        })
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

impl PublishV5 {
    pub(crate) fn decode(
        flags: u8,
        mut body: Bytes,
        max_user_properties: usize,
    ) -> Result<Self, DecodeError> {
        let head = Publish::decode_head(flags, &mut body)?;
        let properties = Properties::decode(&mut body, PropertyContext::Publish, max_user_properties)?;
        // An empty topic stands for the topic of the Topic Alias [MQTT-3.3.2-1]; without an
        // alias it is a protocol error.
        if !(head.topic.is_empty() && properties.topic_alias.is_some()) {
            validate_topic_name(&head.topic)?;
        }
        Ok(PublishV5 { publish: Publish { payload: body, ..head }, properties })
    }

    pub(crate) fn body_len(&self) -> usize {
        self.publish.body_len() + self.properties.encoded_len()
    }

    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        write_string(out, &self.publish.topic);
        if self.publish.pkid_len() > 0 {
            out.put_u16(self.publish.pkid);
        }
        self.properties.encode(out);
        out.put_slice(&self.publish.payload);
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

    fn decode_v5(bytes: &[u8]) -> Result<Option<Packet>, DecodeError> {
        crate::mqtt::Decoder::new(crate::mqtt::ProtocolVersion::V5, MAX)
            .decode(&mut bytes::BytesMut::from(bytes))
    }

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

    fn v5(qos: QoS, pkid: u16, topic: &str, properties: Properties, payload: &'static [u8]) -> Packet {
        Packet::PublishV5(PublishV5 {
            publish: Publish {
                dup: false,
                qos,
                retain: false,
                topic: topic.into(),
                pkid,
                payload: Bytes::from_static(payload),
            },
            properties,
        })
    }

    #[test]
    fn v5_qos1_with_properties() {
        let bytes = [
            0x32, 0x1F, // PUBLISH QoS 1, remaining length 31
            0x00, 0x03, b'a', b'/', b'b', // topic "a/b"
            0x00, 0x07, // packet id 7
            0x15, // properties: 21 bytes
            0x01, 0x01, // payload format indicator: UTF-8
            0x03, 0x00, 0x10, b'a', b'p', b'p', b'l', b'i', b'c', b'a', b't', b'i', b'o', b'n', b'/', b'j',
            b's', b'o', b'n', // content type "application/json"
            b'{', b'}', // payload "{}"
        ];
        let properties = Properties {
            payload_format_indicator: Some(1),
            content_type: Some("application/json".into()),
            ..Properties::default()
        };
        assert_fixture_v5(&bytes, &v5(QoS::AtLeastOnce, 7, "a/b", properties, b"{}"));
    }

    #[test]
    fn v5_qos0_empty_topic_with_alias() {
        let bytes = [
            0x30, 0x08, // PUBLISH QoS 0, remaining length 8
            0x00, 0x00, // empty topic: the alias names it
            0x03, // properties: 3 bytes
            0x23, 0x00, 0x02, // topic alias 2
            b'h', b'i', // payload "hi"
        ];
        let properties = Properties { topic_alias: Some(2), ..Properties::default() };
        assert_fixture_v5(&bytes, &v5(QoS::AtMostOnce, 0, "", properties, b"hi"));
    }

    #[test]
    fn v5_empty_topic_without_alias() {
        let bytes = [
            0x30, 0x04, // PUBLISH QoS 0, remaining length 4
            0x00, 0x00, // empty topic
            0x00, // no properties
            b'x', // payload
        ];
        assert_eq!(decode_v5(&bytes), Err(DecodeError::ZeroLengthTopic));
    }

    #[test]
    fn v5_properties_running_past_the_body() {
        let bytes = [
            0x30, 0x05, // PUBLISH QoS 0, remaining length 5
            0x00, 0x01, b't', // topic "t"
            0x09, // properties claim 9 bytes
            0x01, // one follows
        ];
        assert_eq!(decode_v5(&bytes), Err(DecodeError::Truncated));
        let no_length = [
            0x30, 0x03, // PUBLISH QoS 0, remaining length 3
            0x00, 0x01, b't', // topic "t", then no property length at all
        ];
        assert_eq!(decode_v5(&no_length), Err(DecodeError::Truncated));
    }

    #[test]
    fn v5_reason_string_is_not_a_publish_property() {
        let bytes = [
            0x30, 0x09, // PUBLISH QoS 0, remaining length 9
            0x00, 0x01, b't', // topic "t"
            0x05, // properties: 5 bytes
            0x1F, 0x00, 0x02, b'n', b'o', // reason string "no"
        ];
        assert_eq!(
            decode_v5(&bytes),
            Err(DecodeError::PropertyNotAllowed { property: 0x1F, packet: "PUBLISH" })
        );
    }
}
