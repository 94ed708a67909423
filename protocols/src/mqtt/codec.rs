//! Framing: splits one MQTT 3.1.1 packet off the front of a byte buffer, and encodes packets.

use bytes::{Buf, BufMut, BytesMut};
use thiserror::Error;

use super::ack;
use super::connack::ConnAck;
use super::connect::Connect;
use super::header::{self, FixedHeader, FLAGS_0010};
use super::publish::Publish;
use super::subscribe::{SubAck, Subscribe};
use super::unsubscribe::Unsubscribe;

/// Why the bytes at the front of the buffer are not a valid MQTT 3.1.1 packet.
///
/// All of them mean a protocol violation: the connection should be closed (§4.8), after a
/// CONNACK 0x01 for `UnsupportedProtocolLevel`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The fixed header announces a packet (header included) above the configured maximum.
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    PacketTooLarge {
        /// Whole packet size, fixed header included.
        size: usize,
        /// The limit passed to `decode`.
        max: usize,
    },
    /// The remaining length continues past its fourth byte.
    #[error("remaining length uses more than 4 bytes")]
    MalformedRemainingLength,
    /// Packet type 0 or 15 (reserved).
    #[error("invalid packet type {0}")]
    InvalidPacketType(u8),
    /// The low nibble of the first byte is not what the packet type requires.
    #[error("invalid header flags {flags:#06b} for packet type {packet_type}")]
    InvalidHeaderFlags {
        /// High nibble of the first byte.
        packet_type: u8,
        /// Low nibble of the first byte.
        flags: u8,
    },
    /// A QoS of 3 or more (PUBLISH header, will QoS, requested subscription QoS).
    #[error("invalid QoS {0}")]
    InvalidQoS(u8),
    /// CONNECT protocol name is neither "MQTT" nor "MQIsdp" (first 32 bytes, lossy UTF-8).
    #[error("invalid protocol name {0:?}")]
    InvalidProtocolName(String),
    /// CONNECT with a valid protocol name but a level other than MQIsdp/3 or MQTT/4. The
    /// server answers CONNACK 0x01 (unacceptable protocol version) and disconnects.
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolLevel(u8),
    /// A string field is not valid UTF-8 or contains U+0000 (§1.5.3).
    #[error("string is not valid UTF-8 or contains U+0000")]
    InvalidUtf8,
    /// A topic name or topic filter is empty.
    #[error("zero-length topic")]
    ZeroLengthTopic,
    /// A topic name (PUBLISH, will) contains '+' or '#'.
    #[error("wildcard in topic name")]
    WildcardInTopic,
    /// A topic filter with '+' or '#' not alone in its level, or '#' not last.
    #[error("invalid wildcard placement in topic filter")]
    InvalidTopicFilter,
    /// A packet identifier of 0 where one is required.
    #[error("packet identifier is 0")]
    ZeroPacketId,
    /// A field runs past the end of the packet body.
    #[error("packet body is shorter than its fields")]
    Truncated,
    /// Bytes left after the last field of a fixed-layout packet.
    #[error("packet body is longer than its fields")]
    TrailingBytes,
    /// SUBSCRIBE, UNSUBSCRIBE or SUBACK without any entry.
    #[error("subscription packet without topic filters")]
    EmptySubscription,
    /// CONNECT flags: reserved bit set, will QoS/retain without will, password without username.
    #[error("malformed connect flags")]
    MalformedConnectFlags,
    /// CONNACK acknowledge flags with a reserved bit set.
    #[error("invalid connack flags")]
    InvalidConnAckFlags,
    /// CONNACK return code above 5.
    #[error("invalid connect return code {0}")]
    InvalidConnectReturnCode(u8),
    /// SUBACK return code other than 0, 1, 2 or 0x80.
    #[error("invalid suback return code {0:#04x}")]
    InvalidSubAckReturnCode(u8),
}

/// One MQTT 3.1.1 control packet, in either direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// Client → server: opens the session.
    Connect(Connect),
    /// Server → client: answer to CONNECT.
    ConnAck(ConnAck),
    /// Either way: an application message.
    Publish(Publish),
    /// Answer to a QoS 1 PUBLISH, with its packet id.
    PubAck(u16),
    /// First answer to a QoS 2 PUBLISH.
    PubRec(u16),
    /// Answer to PUBREC.
    PubRel(u16),
    /// Answer to PUBREL; ends the QoS 2 exchange.
    PubComp(u16),
    /// Client → server: add subscriptions.
    Subscribe(Subscribe),
    /// Server → client: answer to SUBSCRIBE.
    SubAck(SubAck),
    /// Client → server: remove subscriptions.
    Unsubscribe(Unsubscribe),
    /// Server → client: answer to UNSUBSCRIBE, with its packet id.
    UnsubAck(u16),
    /// Client → server keepalive.
    PingReq,
    /// Server → client answer to PINGREQ.
    PingResp,
    /// Client → server: clean close, the will is discarded.
    Disconnect,
}

/// Decodes one packet from the front of `buf`.
///
/// `Ok(None)` means more bytes are needed; `buf` is then untouched, and the caller keeps
/// reading into it. On `Ok(Some)` the packet's bytes are split off `buf`; a PUBLISH payload is a
/// zero-copy slice of them. Packets above `max_packet_size` (fixed header included) are refused
/// as soon as their fixed header is complete, so at most 5 bytes of them are ever needed.
/// After an `Err` the content of `buf` is unspecified: close the connection.
pub fn decode(buf: &mut BytesMut, max_packet_size: usize) -> Result<Option<Packet>, DecodeError> {
    let Some(header) = FixedHeader::parse(buf, max_packet_size)? else {
        return Ok(None);
    };
    if buf.len() < header.packet_len() {
        return Ok(None);
    }
    let mut body = buf.split_to(header.packet_len()).freeze();
    body.advance(header.header_len);

    let packet = match header.packet_type {
        header::CONNECT => Packet::Connect(Connect::decode(body)?),
        header::CONNACK => Packet::ConnAck(ConnAck::decode(body)?),
        header::PUBLISH => Packet::Publish(Publish::decode(header.flags, body)?),
        header::PUBACK => Packet::PubAck(ack::decode_packet_id(body)?),
        header::PUBREC => Packet::PubRec(ack::decode_packet_id(body)?),
        header::PUBREL => Packet::PubRel(ack::decode_packet_id(body)?),
        header::PUBCOMP => Packet::PubComp(ack::decode_packet_id(body)?),
        header::SUBSCRIBE => Packet::Subscribe(Subscribe::decode(body)?),
        header::SUBACK => Packet::SubAck(SubAck::decode(body)?),
        header::UNSUBSCRIBE => Packet::Unsubscribe(Unsubscribe::decode(body)?),
        header::UNSUBACK => Packet::UnsubAck(ack::decode_packet_id(body)?),
        header::PINGREQ => header::expect_end(&body).map(|()| Packet::PingReq)?,
        header::PINGRESP => header::expect_end(&body).map(|()| Packet::PingResp)?,
        header::DISCONNECT => header::expect_end(&body).map(|()| Packet::Disconnect)?,
        other => return Err(DecodeError::InvalidPacketType(other)),
    };
    Ok(Some(packet))
}

/// Appends the encoded packet to `out`.
///
/// String and binary fields longer than 65,535 bytes are cut to fit their u16 length prefix;
/// a packet whose body exceeds 256 MiB cannot be represented (check `encoded_len` first).
pub fn encode(packet: &Packet, out: &mut BytesMut) {
    let body_len = body_len(packet);
    out.reserve(packet_len(body_len));
    out.put_u8(first_byte(packet));
    header::write_remaining_length(out, body_len);
    match packet {
        Packet::Connect(connect) => connect.encode_body(out),
        Packet::ConnAck(connack) => connack.encode_body(out),
        Packet::Publish(publish) => publish.encode_body(out),
        Packet::PubAck(pkid)
        | Packet::PubRec(pkid)
        | Packet::PubRel(pkid)
        | Packet::PubComp(pkid)
        | Packet::UnsubAck(pkid) => out.put_u16(*pkid),
        Packet::Subscribe(subscribe) => subscribe.encode_body(out),
        Packet::SubAck(suback) => suback.encode_body(out),
        Packet::Unsubscribe(unsubscribe) => unsubscribe.encode_body(out),
        Packet::PingReq | Packet::PingResp | Packet::Disconnect => {}
    }
}

/// Size of the packet when encoded, fixed header included: what `encode` appends.
pub fn encoded_len(packet: &Packet) -> usize {
    packet_len(body_len(packet))
}

fn packet_len(body_len: usize) -> usize {
    1 + header::remaining_length_len(body_len) + body_len
}

fn body_len(packet: &Packet) -> usize {
    match packet {
        Packet::Connect(connect) => connect.body_len(),
        Packet::ConnAck(_) => ConnAck::BODY_LEN,
        Packet::Publish(publish) => publish.body_len(),
        Packet::PubAck(_)
        | Packet::PubRec(_)
        | Packet::PubRel(_)
        | Packet::PubComp(_)
        | Packet::UnsubAck(_) => ack::BODY_LEN,
        Packet::Subscribe(subscribe) => subscribe.body_len(),
        Packet::SubAck(suback) => suback.body_len(),
        Packet::Unsubscribe(unsubscribe) => unsubscribe.body_len(),
        Packet::PingReq | Packet::PingResp | Packet::Disconnect => 0,
    }
}

fn first_byte(packet: &Packet) -> u8 {
    let (packet_type, flags) = match packet {
        Packet::Connect(_) => (header::CONNECT, 0),
        Packet::ConnAck(_) => (header::CONNACK, 0),
        Packet::Publish(publish) => (header::PUBLISH, publish.header_flags()),
        Packet::PubAck(_) => (header::PUBACK, 0),
        Packet::PubRec(_) => (header::PUBREC, 0),
        Packet::PubRel(_) => (header::PUBREL, FLAGS_0010),
        Packet::PubComp(_) => (header::PUBCOMP, 0),
        Packet::Subscribe(_) => (header::SUBSCRIBE, FLAGS_0010),
        Packet::SubAck(_) => (header::SUBACK, 0),
        Packet::Unsubscribe(_) => (header::UNSUBSCRIBE, FLAGS_0010),
        Packet::UnsubAck(_) => (header::UNSUBACK, 0),
        Packet::PingReq => (header::PINGREQ, 0),
        Packet::PingResp => (header::PINGRESP, 0),
        Packet::Disconnect => (header::DISCONNECT, 0),
    };
    (packet_type << 4) | flags
}

/// Fixture helpers shared by the per-packet test modules.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// Limit used by fixtures: far above any of them.
    pub(crate) const MAX: usize = 1 << 20;

    /// Decodes the first packet of `bytes`.
    pub(crate) fn decode_bytes(bytes: &[u8]) -> Result<Option<Packet>, DecodeError> {
        decode(&mut BytesMut::from(bytes), MAX)
    }

    /// `bytes` decodes to `expected` leaving the start of the next packet in the buffer,
    /// `expected` encodes back to exactly `bytes`, and feeding `bytes` one at a time yields
    /// nothing until the last one.
    pub(crate) fn assert_fixture(bytes: &[u8], expected: &Packet) {
        let next = [
            0xC0, 0x00, // a whole PINGREQ
            0x30, // first byte of a PUBLISH
        ];
        let mut buf = BytesMut::from(bytes);
        buf.extend_from_slice(&next);
        assert_eq!(decode(&mut buf, MAX), Ok(Some(expected.clone())));
        assert_eq!(&buf[..], &next[..]);

        let mut out = BytesMut::new();
        encode(expected, &mut out);
        assert_eq!(&out[..], bytes);
        assert_eq!(encoded_len(expected), bytes.len());

        assert_split_delivery(bytes, expected);
    }

    /// Feeding `bytes` one byte at a time returns `Ok(None)` (leaving the buffer as is) until the
    /// last byte, then the packet.
    pub(crate) fn assert_split_delivery(bytes: &[u8], expected: &Packet) {
        let mut buf = BytesMut::new();
        for (index, &byte) in bytes.iter().enumerate() {
            buf.put_u8(byte);
            let result = decode(&mut buf, MAX);
            if index + 1 < bytes.len() {
                assert_eq!(result, Ok(None), "after {} bytes", index + 1);
                assert_eq!(buf.len(), index + 1);
            } else {
                assert_eq!(result, Ok(Some(expected.clone())));
                assert!(buf.is_empty());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::mqtt::QoS;

    #[test]
    fn header_only_packets() {
        assert_fixture(&[0xC0, 0x00], &Packet::PingReq); // PINGREQ, remaining length 0
        assert_fixture(&[0xD0, 0x00], &Packet::PingResp); // PINGRESP, remaining length 0
        assert_fixture(&[0xE0, 0x00], &Packet::Disconnect); // DISCONNECT, remaining length 0
    }

    #[test]
    fn following_packet_stays_in_the_buffer() {
        let bytes = [
            0xC0, 0x00, // PINGREQ
            0x30, 0x05, 0x00, // start of a PUBLISH, 2 of its 7 bytes missing
        ];
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(decode(&mut buf, MAX), Ok(Some(Packet::PingReq)));
        assert_eq!(&buf[..], &bytes[2..]);
        assert_eq!(decode(&mut buf, MAX), Ok(None));
        assert_eq!(&buf[..], &bytes[2..]);
        buf.extend_from_slice(&[
            0x01, b't', // rest of topic "t"
            b'h', b'i', // payload "hi"
        ]);
        let Ok(Some(Packet::Publish(publish))) = decode(&mut buf, MAX) else {
            panic!("expected a publish");
        };
        assert_eq!(publish.topic, "t");
        assert_eq!(&publish.payload[..], b"hi");
        assert!(buf.is_empty());
    }

    #[test]
    fn huge_remaining_length_is_refused_from_the_header_alone() {
        let mut buf = BytesMut::from(
            &[
                0x30, // PUBLISH QoS 0
                0xFF, 0xFF, 0xFF, // remaining length, not finished yet
            ][..],
        );
        assert_eq!(decode(&mut buf, 1024), Ok(None));
        buf.put_u8(0x7F); // last length byte: 268,435,455
        assert_eq!(
            decode(&mut buf, 1024),
            Err(DecodeError::PacketTooLarge { size: 268_435_455 + 5, max: 1024 })
        );
    }

    #[test]
    fn size_limit_counts_the_fixed_header() {
        let bytes = [
            0x30, 0x04, // PUBLISH QoS 0, remaining length 4
            0x00, 0x01, b't', // topic "t"
            b'x', // payload
        ];
        assert!(decode(&mut BytesMut::from(&bytes[..]), 6).unwrap().is_some());
        assert_eq!(
            decode(&mut BytesMut::from(&bytes[..]), 5),
            Err(DecodeError::PacketTooLarge { size: 6, max: 5 })
        );
    }

    #[test]
    fn header_errors() {
        assert_eq!(
            decode_bytes(&[0x30, 0x80, 0x80, 0x80, 0x80]), // 5 length bytes
            Err(DecodeError::MalformedRemainingLength)
        );
        assert_eq!(
            decode_bytes(&[0x00, 0x00]), // type 0
            Err(DecodeError::InvalidPacketType(0))
        );
        assert_eq!(
            decode_bytes(&[0xF0, 0x00]), // type 15
            Err(DecodeError::InvalidPacketType(15))
        );
        assert_eq!(
            decode_bytes(&[0xC2, 0x00]), // PINGREQ with flags 0b0010
            Err(DecodeError::InvalidHeaderFlags { packet_type: 12, flags: 2 })
        );
        assert_eq!(
            decode_bytes(&[0xE0, 0x01, 0x00]), // DISCONNECT with a body byte
            Err(DecodeError::TrailingBytes)
        );
        // An HTTP request on the MQTT port: 'G' = PUBACK with flags 0b0111.
        assert_eq!(
            decode_bytes(b"GET / HTTP/1.1\r\n"),
            Err(DecodeError::InvalidHeaderFlags { packet_type: 4, flags: 7 })
        );
    }

    #[test]
    fn publish_payload_is_a_zero_copy_slice_of_the_buffer() {
        let bytes = [
            0x30, 0x07, // PUBLISH QoS 0, remaining length 7
            0x00, 0x01, b't', // topic "t"
            b'a', b'b', b'c', b'd', // payload
        ];
        let mut buf = BytesMut::from(&bytes[..]);
        let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
        let Ok(Some(Packet::Publish(publish))) = decode(&mut buf, MAX) else {
            panic!("expected a publish");
        };
        assert!(range.contains(&(publish.payload.as_ptr() as usize)));
        assert_eq!(publish.qos, QoS::AtMostOnce);
    }
}

#[cfg(test)]
mod proptests {
    use bytes::Bytes;
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::testing::assert_split_delivery;
    use super::*;
    use crate::mqtt::{ConnectReturnCode, QoS, Will};

    fn qos() -> impl Strategy<Value = QoS> {
        prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce), Just(QoS::ExactlyOnce)]
    }

    fn pkid() -> impl Strategy<Value = u16> {
        1..=u16::MAX
    }

    /// Any UTF-8 without U+0000.
    fn text() -> impl Strategy<Value = String> {
        "[^\\x00]{0,12}"
    }

    fn topic_name() -> impl Strategy<Value = String> {
        "[^\\x00+#]{1,12}"
    }

    fn topic_filter() -> impl Strategy<Value = String> {
        let level = prop_oneof![Just("+".to_owned()), "[^\\x00+#/]{0,6}"];
        (vec(level, 1..4), any::<bool>()).prop_map(|(levels, multi)| {
            let mut filter = levels.join("/");
            if multi || filter.is_empty() {
                filter.push_str("/#");
            }
            filter
        })
    }

    fn binary(max: usize) -> impl Strategy<Value = Bytes> {
        vec(any::<u8>(), 0..max).prop_map(Bytes::from)
    }

    fn will() -> impl Strategy<Value = Will> {
        (topic_name(), binary(16), qos(), any::<bool>()).prop_map(|(topic, payload, qos, retain)| Will {
            topic,
            payload,
            qos,
            retain,
        })
    }

    fn connect() -> impl Strategy<Value = Connect> {
        (
            prop_oneof![Just(3u8), Just(4u8)],
            any::<bool>(),
            any::<u16>(),
            text(),
            proptest::option::of(will()),
            proptest::option::of(text()),
            proptest::option::of(binary(16)),
        )
            .prop_map(
                |(protocol_level, clean_session, keep_alive_secs, client_id, will, username, password)| {
                    // 3.1.1 forbids a password without a username [MQTT-3.1.2-22].
                    let password = password.filter(|_| protocol_level == 3 || username.is_some());
                    Connect {
                        protocol_level,
                        clean_session,
                        keep_alive_secs,
                        client_id,
                        will,
                        username,
                        password,
                    }
                },
            )
    }

    fn return_code() -> impl Strategy<Value = ConnectReturnCode> {
        (0u8..=5).prop_map(|code| ConnectReturnCode::from_u8(code).unwrap())
    }

    fn publish() -> impl Strategy<Value = Publish> {
        (qos(), any::<bool>(), any::<bool>(), topic_name(), pkid(), binary(300)).prop_map(
            |(qos, dup, retain, topic, pkid, payload)| {
                let at_most_once = qos == QoS::AtMostOnce;
                Publish {
                    dup: dup && !at_most_once,
                    qos,
                    retain,
                    topic,
                    pkid: if at_most_once { 0 } else { pkid },
                    payload,
                }
            },
        )
    }

    fn packet() -> impl Strategy<Value = Packet> {
        prop_oneof![
            connect().prop_map(Packet::Connect),
            (any::<bool>(), return_code())
                .prop_map(|(session_present, code)| { Packet::ConnAck(ConnAck { session_present, code }) }),
            publish().prop_map(Packet::Publish),
            pkid().prop_map(Packet::PubAck),
            pkid().prop_map(Packet::PubRec),
            pkid().prop_map(Packet::PubRel),
            pkid().prop_map(Packet::PubComp),
            (pkid(), vec((topic_filter(), qos()), 1..5))
                .prop_map(|(pkid, filters)| Packet::Subscribe(Subscribe { pkid, filters })),
            (pkid(), vec(prop_oneof![Just(0u8), Just(1), Just(2), Just(0x80)], 1..5))
                .prop_map(|(pkid, return_codes)| Packet::SubAck(SubAck { pkid, return_codes })),
            (pkid(), vec(topic_filter(), 1..5))
                .prop_map(|(pkid, filters)| Packet::Unsubscribe(Unsubscribe { pkid, filters })),
            pkid().prop_map(Packet::UnsubAck),
            Just(Packet::PingReq),
            Just(Packet::PingResp),
            Just(Packet::Disconnect),
        ]
    }

    /// Decodes everything in `buf` until it needs more bytes or fails, checking the limits.
    fn decode_all_within_limit(buf: &mut BytesMut, max: usize) {
        loop {
            let before = buf.len();
            match decode(buf, max) {
                Ok(Some(packet)) => {
                    let consumed = before - buf.len();
                    assert!(consumed <= max, "decoded {consumed} bytes with max {max}");
                    // Non-minimal remaining lengths make the input longer than our encoding.
                    assert!(encoded_len(&packet) <= consumed);
                    let mut again = BytesMut::new();
                    encode(&packet, &mut again);
                    assert_eq!(decode(&mut again, usize::MAX), Ok(Some(packet)));
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before);
                    return;
                }
                Err(_) => return,
            }
        }
    }

    proptest! {
        #[test]
        fn round_trip(packet in packet()) {
            let mut out = BytesMut::new();
            encode(&packet, &mut out);
            prop_assert_eq!(out.len(), encoded_len(&packet));
            let encoded = out.clone();
            prop_assert_eq!(decode(&mut out, encoded.len()), Ok(Some(packet.clone())));
            prop_assert!(out.is_empty());
            if encoded.len() > 1 {
                prop_assert_eq!(
                    decode(&mut BytesMut::from(&encoded[..]), encoded.len() - 1),
                    Err(DecodeError::PacketTooLarge { size: encoded.len(), max: encoded.len() - 1 })
                );
            }
        }

        #[test]
        fn back_to_back_packets_split_anywhere(
            first in packet(),
            second in packet(),
            split in any::<prop::sample::Index>(),
        ) {
            let mut stream = BytesMut::new();
            encode(&first, &mut stream);
            encode(&second, &mut stream);
            let split = split.index(stream.len() + 1);
            let mut buf = BytesMut::from(&stream[..split]);
            let mut decoded = Vec::new();
            while let Some(packet) = decode(&mut buf, usize::MAX).unwrap() {
                decoded.push(packet);
            }
            buf.extend_from_slice(&stream[split..]);
            while let Some(packet) = decode(&mut buf, usize::MAX).unwrap() {
                decoded.push(packet);
            }
            prop_assert_eq!(decoded, vec![first, second]);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn byte_at_a_time(packet in packet()) {
            let mut out = BytesMut::new();
            encode(&packet, &mut out);
            assert_split_delivery(&out, &packet);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..300), max in 0usize..400) {
            decode_all_within_limit(&mut BytesMut::from(&bytes[..]), max);
        }

        #[test]
        fn mutated_packets_never_panic(
            packet in packet(),
            edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
            max in 0usize..400,
        ) {
            let mut out = BytesMut::new();
            encode(&packet, &mut out);
            for (at, value) in edits {
                let at = at.index(out.len());
                out[at] = value;
            }
            let cut = cut.index(out.len() + 1);
            decode_all_within_limit(&mut BytesMut::from(&out[..cut]), max);
        }
    }
}
