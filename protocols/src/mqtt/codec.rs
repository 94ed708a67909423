//! Framing: splits one MQTT packet (3.1, 3.1.1 or 5) off the front of a byte buffer, and
//! encodes packets. The protocol level of a connection decides how packets after CONNECT parse,
//! so decoding goes through a [`Decoder`] that knows it; encoding needs no level, since each
//! [`Packet`] variant belongs to one protocol version.

use bytes::{Buf, BufMut, BytesMut};
use thiserror::Error;

use super::ack::{self, AckV5};
use super::auth::Auth;
use super::connack::{ConnAck, ConnAckV5};
use super::connect::{self, Connect, ConnectV5};
use super::disconnect::DisconnectV5;
use super::header::{self, FixedHeader, ProtocolVersion, FLAGS_0010};
use super::publish::{Publish, PublishV5};
use super::reason::ReasonCode;
use super::subscribe::{SubAck, SubAckV5, Subscribe, SubscribeV5};
use super::unsubscribe::{UnsubAckV5, Unsubscribe, UnsubscribeV5};

/// Why the bytes at the front of the buffer are not a valid MQTT packet.
///
/// All of them mean a protocol violation: the connection should be closed (§4.8), after a
/// CONNACK 0x01 for `UnsupportedProtocolLevel`, and on an MQTT 5 connection after a DISCONNECT
/// with [`DecodeError::reason_code`].
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
    /// Packet type 0, or 15 outside MQTT 5 (reserved).
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
    /// CONNECT with a valid protocol name but a level other than MQIsdp/3, MQTT/4 or MQTT/5.
    /// The server answers CONNACK 0x01 (unacceptable protocol version) and disconnects.
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolLevel(u8),
    /// A string field is not valid UTF-8 or contains U+0000 (§1.5.3).
    #[error("string is not valid UTF-8 or contains U+0000")]
    InvalidUtf8,
    /// A topic name or topic filter is empty (in MQTT 5, a topic name without a Topic Alias).
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
    /// SUBSCRIBE, UNSUBSCRIBE, SUBACK or UNSUBACK (5) without any entry.
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
    /// A variable byte integer (MQTT 5 property length or value) continues past its 4th byte.
    #[error("variable byte integer uses more than 4 bytes")]
    MalformedVariableInteger,
    /// A property identifier MQTT 5 does not define.
    #[error("unknown property identifier {0:#04x}")]
    UnknownProperty(u32),
    /// A property that may appear once appears twice (a protocol error, §2.2.2.2).
    #[error("property {0:#04x} appears more than once")]
    DuplicateProperty(u8),
    /// A property this packet may not carry (a protocol error).
    #[error("property {property:#04x} is not allowed in {packet}")]
    PropertyNotAllowed {
        /// The property identifier.
        property: u8,
        /// The packet (or will) it appeared in.
        packet: &'static str,
    },
    /// A property value outside its range, e.g. Receive Maximum 0 (a protocol error).
    #[error("property {property:#04x} has the invalid value {value}")]
    InvalidPropertyValue {
        /// The property identifier.
        property: u8,
        /// The value read.
        value: u32,
    },
    /// More User Properties in one packet than the configured maximum; refused before they are
    /// allocated.
    #[error("more than {max} user properties in one packet")]
    TooManyUserProperties {
        /// The configured maximum.
        max: usize,
    },
    /// A reason code byte MQTT 5 does not define.
    #[error("invalid reason code {0:#04x}")]
    InvalidReasonCode(u8),
    /// An MQTT 5 subscription options byte with reserved bits or retain handling 3.
    #[error("invalid subscription options {0:#010b}")]
    InvalidSubscriptionOptions(u8),
}

impl DecodeError {
    /// The MQTT 5 reason code a server sends (in DISCONNECT, or CONNACK) for this error:
    /// 0x95 packet too large, 0x97 quota exceeded (too many user properties), 0x82 protocol
    /// error for well-formed packets that break a rule, 0x84 for an unsupported level, and 0x81
    /// malformed packet for everything else.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            DecodeError::PacketTooLarge { .. } => ReasonCode::PacketTooLarge,
            DecodeError::TooManyUserProperties { .. } => ReasonCode::QuotaExceeded,
            DecodeError::UnsupportedProtocolLevel(_) => ReasonCode::UnsupportedProtocolVersion,
            DecodeError::DuplicateProperty(_)
            | DecodeError::PropertyNotAllowed { .. }
            | DecodeError::InvalidPropertyValue { .. }
            | DecodeError::ZeroLengthTopic => ReasonCode::ProtocolError,
            _ => ReasonCode::MalformedPacket,
        }
    }
}

/// One MQTT control packet, in either direction. The 3.1/3.1.1 forms come first; the MQTT 5
/// forms (suffix `V5`, plus `Auth`) follow. PINGREQ and PINGRESP are the same in every version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// Client → server: opens the session (3.1, 3.1.1).
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
    /// MQTT 5 CONNECT. Boxed: it is large and comes once per connection.
    ConnectV5(Box<ConnectV5>),
    /// MQTT 5 CONNACK.
    ConnAckV5(ConnAckV5),
    /// MQTT 5 PUBLISH.
    PublishV5(PublishV5),
    /// MQTT 5 PUBACK.
    PubAckV5(AckV5),
    /// MQTT 5 PUBREC.
    PubRecV5(AckV5),
    /// MQTT 5 PUBREL.
    PubRelV5(AckV5),
    /// MQTT 5 PUBCOMP.
    PubCompV5(AckV5),
    /// MQTT 5 SUBSCRIBE.
    SubscribeV5(SubscribeV5),
    /// MQTT 5 SUBACK.
    SubAckV5(SubAckV5),
    /// MQTT 5 UNSUBSCRIBE.
    UnsubscribeV5(UnsubscribeV5),
    /// MQTT 5 UNSUBACK.
    UnsubAckV5(UnsubAckV5),
    /// MQTT 5 DISCONNECT, in either direction.
    DisconnectV5(DisconnectV5),
    /// MQTT 5 AUTH.
    Auth(Auth),
}

impl Packet {
    /// A client's CONNECT as the packet of its version: MQTT 5 (protocol level 5, no CONNECT or
    /// will properties) or 3.1/3.1.1.
    pub fn connect(connect: Connect) -> Packet {
        if connect.protocol_level == 5 {
            Packet::ConnectV5(Box::new(ConnectV5 {
                connect,
                properties: super::Properties::default(),
                will_properties: super::Properties::default(),
            }))
        } else {
            Packet::Connect(connect)
        }
    }

    /// The property list of an MQTT 5 packet the server sends with diagnostics (CONNACK, acks,
    /// SUBACK, UNSUBACK, DISCONNECT, AUTH); `None` for the others.
    pub fn properties_mut(&mut self) -> Option<&mut super::Properties> {
        match self {
            Packet::ConnAckV5(p) => Some(&mut p.properties),
            Packet::PubAckV5(p) | Packet::PubRecV5(p) | Packet::PubRelV5(p) | Packet::PubCompV5(p) => {
                Some(&mut p.properties)
            }
            Packet::SubAckV5(p) => Some(&mut p.properties),
            Packet::UnsubAckV5(p) => Some(&mut p.properties),
            Packet::DisconnectV5(p) => Some(&mut p.properties),
            Packet::Auth(p) => Some(&mut p.properties),
            _ => None,
        }
    }
}

/// How the packets of one connection are decoded: its protocol version and limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoder {
    /// 3.1/3.1.1 until an MQTT 5 CONNECT is accepted (CONNECT decodes the same either way).
    pub version: ProtocolVersion,
    /// Largest packet accepted, fixed header included; larger ones are refused from the header.
    pub max_packet_size: usize,
    /// Most User Properties accepted in one packet (MQTT 5); more is an error before any of
    /// them is allocated.
    pub max_user_properties: usize,
}

impl Decoder {
    /// A decoder for `version` with no cap on user properties (packet size still bounds them).
    pub fn new(version: ProtocolVersion, max_packet_size: usize) -> Self {
        Self { version, max_packet_size, max_user_properties: usize::MAX }
    }

    /// Decodes one packet from the front of `buf`.
    ///
    /// `Ok(None)` means more bytes are needed; `buf` is then untouched, and the caller keeps
    /// reading into it. On `Ok(Some)` the packet's bytes are split off `buf`; a PUBLISH payload
    /// is a zero-copy slice of them. Packets above `max_packet_size` (fixed header included) are
    /// refused as soon as their fixed header is complete, so at most 5 bytes of them are ever
    /// needed. After an `Err` the content of `buf` is unspecified: close the connection.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        let Some(header) = FixedHeader::parse(buf, self.max_packet_size, self.version)? else {
            return Ok(None);
        };
        if buf.len() < header.packet_len() {
            return Ok(None);
        }
        let mut body = buf.split_to(header.packet_len()).freeze();
        body.advance(header.header_len);
        let max_user = self.max_user_properties;

        let packet = if self.version.is_v5() {
            match header.packet_type {
                header::CONNECT => connect::decode(body, max_user)?,
                header::CONNACK => Packet::ConnAckV5(ConnAckV5::decode(body, max_user)?),
                header::PUBLISH => Packet::PublishV5(PublishV5::decode(header.flags, body, max_user)?),
                header::PUBACK => Packet::PubAckV5(AckV5::decode(body, max_user)?),
                header::PUBREC => Packet::PubRecV5(AckV5::decode(body, max_user)?),
                header::PUBREL => Packet::PubRelV5(AckV5::decode(body, max_user)?),
                header::PUBCOMP => Packet::PubCompV5(AckV5::decode(body, max_user)?),
                header::SUBSCRIBE => Packet::SubscribeV5(SubscribeV5::decode(body, max_user)?),
                header::SUBACK => Packet::SubAckV5(SubAckV5::decode(body, max_user)?),
                header::UNSUBSCRIBE => Packet::UnsubscribeV5(UnsubscribeV5::decode(body, max_user)?),
                header::UNSUBACK => Packet::UnsubAckV5(UnsubAckV5::decode(body, max_user)?),
                header::PINGREQ => header::expect_end(&body).map(|()| Packet::PingReq)?,
                header::PINGRESP => header::expect_end(&body).map(|()| Packet::PingResp)?,
                header::DISCONNECT => Packet::DisconnectV5(DisconnectV5::decode(body, max_user)?),
                header::AUTH => Packet::Auth(Auth::decode(body, max_user)?),
                other => return Err(DecodeError::InvalidPacketType(other)),
            }
        } else {
            match header.packet_type {
                header::CONNECT => connect::decode(body, max_user)?,
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
            }
        };
        Ok(Some(packet))
    }
}

/// Decodes one packet from the front of `buf` as a 3.1/3.1.1 connection (or any connection
/// before its CONNECT) would: [`Decoder::decode`] with `ProtocolVersion::V311` and no cap on
/// user properties. A CONNECT of any supported level decodes.
pub fn decode(buf: &mut BytesMut, max_packet_size: usize) -> Result<Option<Packet>, DecodeError> {
    Decoder::new(ProtocolVersion::V311, max_packet_size).decode(buf)
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
        Packet::Connect(connect) => connect.encode_body(out, None),
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
        Packet::ConnectV5(c) => c.connect.encode_body(out, Some((&c.properties, &c.will_properties))),
        Packet::ConnAckV5(connack) => connack.encode_body(out),
        Packet::PublishV5(publish) => publish.encode_body(out),
        Packet::PubAckV5(ack) | Packet::PubRecV5(ack) | Packet::PubRelV5(ack) | Packet::PubCompV5(ack) => {
            ack.encode_body(out)
        }
        Packet::SubscribeV5(subscribe) => subscribe.encode_body(out),
        Packet::SubAckV5(suback) => suback.encode_body(out),
        Packet::UnsubscribeV5(unsubscribe) => unsubscribe.encode_body(out),
        Packet::UnsubAckV5(unsuback) => unsuback.encode_body(out),
        Packet::DisconnectV5(disconnect) => disconnect.encode_body(out),
        Packet::Auth(auth) => auth.encode_body(out),
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
        Packet::Connect(connect) => connect.body_len(None),
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
        Packet::ConnectV5(c) => c.connect.body_len(Some((&c.properties, &c.will_properties))),
        Packet::ConnAckV5(connack) => connack.body_len(),
        Packet::PublishV5(publish) => publish.body_len(),
        Packet::PubAckV5(ack) | Packet::PubRecV5(ack) | Packet::PubRelV5(ack) | Packet::PubCompV5(ack) => {
            ack.body_len()
        }
        Packet::SubscribeV5(subscribe) => subscribe.body_len(),
        Packet::SubAckV5(suback) => suback.body_len(),
        Packet::UnsubscribeV5(unsubscribe) => unsubscribe.body_len(),
        Packet::UnsubAckV5(unsuback) => unsuback.body_len(),
        Packet::DisconnectV5(disconnect) => disconnect.body_len(),
        Packet::Auth(auth) => auth.body_len(),
    }
}

fn first_byte(packet: &Packet) -> u8 {
    let (packet_type, flags) = match packet {
        Packet::Connect(_) | Packet::ConnectV5(_) => (header::CONNECT, 0),
        Packet::ConnAck(_) | Packet::ConnAckV5(_) => (header::CONNACK, 0),
        Packet::Publish(publish) => (header::PUBLISH, publish.header_flags()),
        Packet::PublishV5(publish) => (header::PUBLISH, publish.publish.header_flags()),
        Packet::PubAck(_) | Packet::PubAckV5(_) => (header::PUBACK, 0),
        Packet::PubRec(_) | Packet::PubRecV5(_) => (header::PUBREC, 0),
        Packet::PubRel(_) | Packet::PubRelV5(_) => (header::PUBREL, FLAGS_0010),
        Packet::PubComp(_) | Packet::PubCompV5(_) => (header::PUBCOMP, 0),
        Packet::Subscribe(_) | Packet::SubscribeV5(_) => (header::SUBSCRIBE, FLAGS_0010),
        Packet::SubAck(_) | Packet::SubAckV5(_) => (header::SUBACK, 0),
        Packet::Unsubscribe(_) | Packet::UnsubscribeV5(_) => (header::UNSUBSCRIBE, FLAGS_0010),
        Packet::UnsubAck(_) | Packet::UnsubAckV5(_) => (header::UNSUBACK, 0),
        Packet::PingReq => (header::PINGREQ, 0),
        Packet::PingResp => (header::PINGRESP, 0),
        Packet::Disconnect | Packet::DisconnectV5(_) => (header::DISCONNECT, 0),
        Packet::Auth(_) => (header::AUTH, 0),
    };
    (packet_type << 4) | flags
}

/// Fixture helpers shared by the per-packet test modules.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// Limit used by fixtures: far above any of them.
    pub(crate) const MAX: usize = 1 << 20;

    /// Decodes the first packet of `bytes` as 3.1.1.
    pub(crate) fn decode_bytes(bytes: &[u8]) -> Result<Option<Packet>, DecodeError> {
        decode(&mut BytesMut::from(bytes), MAX)
    }

    /// [`assert_fixture_with`] for a 3.1/3.1.1 connection.
    pub(crate) fn assert_fixture(bytes: &[u8], expected: &Packet) {
        assert_fixture_with(Decoder::new(ProtocolVersion::V311, MAX), bytes, expected);
    }

    /// [`assert_fixture_with`] for an MQTT 5 connection.
    pub(crate) fn assert_fixture_v5(bytes: &[u8], expected: &Packet) {
        assert_fixture_with(Decoder::new(ProtocolVersion::V5, MAX), bytes, expected);
    }

    /// `bytes` decodes to `expected` leaving the start of the next packet in the buffer,
    /// `expected` encodes back to exactly `bytes`, and feeding `bytes` one at a time yields
    /// nothing until the last one.
    pub(crate) fn assert_fixture_with(decoder: Decoder, bytes: &[u8], expected: &Packet) {
        let next = [
            0xC0, 0x00, // a whole PINGREQ
            0x30, // first byte of a PUBLISH
        ];
        let mut buf = BytesMut::from(bytes);
        buf.extend_from_slice(&next);
        assert_eq!(decoder.decode(&mut buf), Ok(Some(expected.clone())));
        assert_eq!(&buf[..], &next[..]);

        let mut out = BytesMut::new();
        encode(expected, &mut out);
        assert_eq!(&out[..], bytes);
        assert_eq!(encoded_len(expected), bytes.len());

        assert_split_delivery(decoder, bytes, expected);
    }

    /// Feeding `bytes` one byte at a time returns `Ok(None)` (leaving the buffer as is) until the
    /// last byte, then the packet.
    pub(crate) fn assert_split_delivery(decoder: Decoder, bytes: &[u8], expected: &Packet) {
        let mut buf = BytesMut::new();
        for (index, &byte) in bytes.iter().enumerate() {
            buf.put_u8(byte);
            let result = decoder.decode(&mut buf);
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
    fn a_connect_becomes_the_packet_of_its_protocol_level() {
        let connect = |protocol_level| Connect {
            protocol_level,
            clean_session: true,
            keep_alive_secs: 60,
            client_id: "d".into(),
            will: None,
            username: None,
            password: None,
        };
        match Packet::connect(connect(5)) {
            Packet::ConnectV5(v5) => {
                assert_eq!(v5.connect, connect(5));
                assert!(v5.properties.is_empty() && v5.will_properties.is_empty());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(Packet::connect(connect(4)), Packet::Connect(connect(4)));
        assert_eq!(Packet::connect(connect(3)), Packet::Connect(connect(3)));
    }

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
    use crate::mqtt::properties::PropertyContext;
    use crate::mqtt::{ConnectReturnCode, Properties, QoS, SubscriptionOptions, Will};

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

    // ---- MQTT 5 ----

    fn reason() -> impl Strategy<Value = ReasonCode> {
        prop::sample::select(ReasonCode::all())
    }

    /// A property list with only what `context` allows, each property present or not.
    fn properties(context: PropertyContext) -> impl Strategy<Value = Properties> {
        let opt_text = || proptest::option::of(text());
        let opt_flag = || proptest::option::of(0u8..=1);
        let message = (
            opt_flag(),
            proptest::option::of(any::<u32>()),
            opt_text(),
            proptest::option::of(topic_name()),
            proptest::option::of(binary(8)),
            vec(1u32..=268_435_455, 0..3),
            proptest::option::of(any::<u16>()),
            proptest::option::of(any::<u32>()),
        );
        let session = (
            proptest::option::of(any::<u32>()),
            opt_text(),
            proptest::option::of(any::<u16>()),
            opt_text(),
            proptest::option::of(binary(8)),
            opt_flag(),
            opt_flag(),
            opt_text(),
            opt_text(),
            opt_text(),
        );
        let limits = (
            proptest::option::of(1u16..),
            proptest::option::of(any::<u16>()),
            opt_flag(),
            opt_flag(),
            vec((text(), text()), 0..3),
            proptest::option::of(1u32..),
            opt_flag(),
            opt_flag(),
            opt_flag(),
        );
        (message, session, limits).prop_map(move |(message, session, limits)| {
            let all = Properties {
                payload_format_indicator: message.0,
                message_expiry_interval: message.1,
                content_type: message.2,
                response_topic: message.3,
                correlation_data: message.4,
                subscription_identifiers: message.5,
                topic_alias: message.6,
                will_delay_interval: message.7,
                session_expiry_interval: session.0,
                assigned_client_identifier: session.1,
                server_keep_alive: session.2,
                authentication_method: session.3,
                authentication_data: session.4,
                request_problem_information: session.5,
                request_response_information: session.6,
                response_information: session.7,
                server_reference: session.8,
                reason_string: session.9,
                receive_maximum: limits.0,
                topic_alias_maximum: limits.1,
                maximum_qos: limits.2,
                retain_available: limits.3,
                user_properties: limits.4,
                maximum_packet_size: limits.5,
                wildcard_subscription_available: limits.6,
                subscription_identifier_available: limits.7,
                shared_subscription_available: limits.8,
            };
            only_allowed(all, context)
        })
    }

    /// Clears every property `context` may not carry.
    fn only_allowed(mut p: Properties, context: PropertyContext) -> Properties {
        use crate::mqtt::properties::id::*;
        fn keep<T>(slot: &mut Option<T>, allowed: bool) {
            if !allowed {
                *slot = None;
            }
        }
        let allows = |property| context.allows(property);
        keep(&mut p.payload_format_indicator, allows(PAYLOAD_FORMAT_INDICATOR));
        keep(&mut p.message_expiry_interval, allows(MESSAGE_EXPIRY_INTERVAL));
        keep(&mut p.content_type, allows(CONTENT_TYPE));
        keep(&mut p.response_topic, allows(RESPONSE_TOPIC));
        keep(&mut p.correlation_data, allows(CORRELATION_DATA));
        if !allows(SUBSCRIPTION_IDENTIFIER) {
            p.subscription_identifiers.clear();
        } else if context == PropertyContext::Subscribe {
            p.subscription_identifiers.truncate(1);
        }
        keep(&mut p.topic_alias, allows(TOPIC_ALIAS));
        keep(&mut p.will_delay_interval, allows(WILL_DELAY_INTERVAL));
        keep(&mut p.session_expiry_interval, allows(SESSION_EXPIRY_INTERVAL));
        keep(&mut p.assigned_client_identifier, allows(ASSIGNED_CLIENT_IDENTIFIER));
        keep(&mut p.server_keep_alive, allows(SERVER_KEEP_ALIVE));
        keep(&mut p.authentication_method, allows(AUTHENTICATION_METHOD));
        keep(&mut p.authentication_data, allows(AUTHENTICATION_DATA));
        keep(&mut p.request_problem_information, allows(REQUEST_PROBLEM_INFORMATION));
        keep(&mut p.request_response_information, allows(REQUEST_RESPONSE_INFORMATION));
        keep(&mut p.response_information, allows(RESPONSE_INFORMATION));
        keep(&mut p.server_reference, allows(SERVER_REFERENCE));
        keep(&mut p.reason_string, allows(REASON_STRING));
        keep(&mut p.receive_maximum, allows(RECEIVE_MAXIMUM));
        keep(&mut p.topic_alias_maximum, allows(TOPIC_ALIAS_MAXIMUM));
        keep(&mut p.maximum_qos, allows(MAXIMUM_QOS));
        keep(&mut p.retain_available, allows(RETAIN_AVAILABLE));
        keep(&mut p.maximum_packet_size, allows(MAXIMUM_PACKET_SIZE));
        keep(&mut p.wildcard_subscription_available, allows(WILDCARD_SUBSCRIPTION_AVAILABLE));
        keep(&mut p.subscription_identifier_available, allows(SUBSCRIPTION_IDENTIFIER_AVAILABLE));
        keep(&mut p.shared_subscription_available, allows(SHARED_SUBSCRIPTION_AVAILABLE));
        p
    }

    fn connect_v5() -> impl Strategy<Value = Packet> {
        (
            connect(),
            proptest::option::of(binary(8)),
            properties(PropertyContext::Connect),
            properties(PropertyContext::Will),
        )
            .prop_map(|(connect, password, properties, will_properties)| {
                // MQTT 5 allows a password without a username.
                let connect =
                    Connect { protocol_level: 5, password: password.or(connect.password), ..connect };
                let will_properties =
                    if connect.will.is_some() { will_properties } else { Properties::default() };
                Packet::ConnectV5(Box::new(ConnectV5 { connect, properties, will_properties }))
            })
    }

    fn publish_v5() -> impl Strategy<Value = Packet> {
        (publish(), properties(PropertyContext::Publish), any::<bool>()).prop_map(
            |(mut publish, properties, use_alias_only)| {
                if use_alias_only && properties.topic_alias.is_some() {
                    publish.topic.clear();
                }
                Packet::PublishV5(PublishV5 { publish, properties })
            },
        )
    }

    fn ack_v5() -> impl Strategy<Value = AckV5> {
        (pkid(), reason(), properties(PropertyContext::Ack)).prop_map(|(pkid, reason, properties)| AckV5 {
            pkid,
            reason,
            properties,
        })
    }

    fn subscription_options() -> impl Strategy<Value = SubscriptionOptions> {
        (qos(), any::<bool>(), any::<bool>(), 0u8..=2).prop_map(
            |(qos, no_local, retain_as_published, retain_handling)| SubscriptionOptions {
                qos,
                no_local,
                retain_as_published,
                retain_handling,
            },
        )
    }

    fn packet_v5() -> impl Strategy<Value = Packet> {
        prop_oneof![
            connect_v5(),
            (any::<bool>(), reason(), properties(PropertyContext::ConnAck)).prop_map(
                |(session_present, reason, properties)| Packet::ConnAckV5(ConnAckV5 {
                    session_present,
                    reason,
                    properties
                })
            ),
            publish_v5(),
            ack_v5().prop_map(Packet::PubAckV5),
            ack_v5().prop_map(Packet::PubRecV5),
            ack_v5().prop_map(Packet::PubRelV5),
            ack_v5().prop_map(Packet::PubCompV5),
            (
                pkid(),
                properties(PropertyContext::Subscribe),
                vec((topic_filter(), subscription_options()), 1..4)
            )
                .prop_map(|(pkid, properties, filters)| Packet::SubscribeV5(SubscribeV5 {
                    pkid,
                    properties,
                    filters
                })),
            (pkid(), properties(PropertyContext::SubAck), vec(reason(), 1..4)).prop_map(
                |(pkid, properties, reason_codes)| Packet::SubAckV5(SubAckV5 {
                    pkid,
                    properties,
                    reason_codes
                })
            ),
            (pkid(), properties(PropertyContext::Unsubscribe), vec(topic_filter(), 1..4)).prop_map(
                |(pkid, properties, filters)| Packet::UnsubscribeV5(UnsubscribeV5 {
                    unsubscribe: Unsubscribe { pkid, filters },
                    properties
                })
            ),
            (pkid(), properties(PropertyContext::UnsubAck), vec(reason(), 1..4)).prop_map(
                |(pkid, properties, reason_codes)| Packet::UnsubAckV5(UnsubAckV5 {
                    pkid,
                    properties,
                    reason_codes
                })
            ),
            (reason(), properties(PropertyContext::Disconnect))
                .prop_map(|(reason, properties)| Packet::DisconnectV5(DisconnectV5 { reason, properties })),
            (reason(), properties(PropertyContext::Auth))
                .prop_map(|(reason, properties)| Packet::Auth(Auth { reason, properties })),
            Just(Packet::PingReq),
            Just(Packet::PingResp),
        ]
    }

    fn v3() -> Decoder {
        Decoder::new(ProtocolVersion::V311, usize::MAX)
    }

    fn v5() -> Decoder {
        Decoder::new(ProtocolVersion::V5, usize::MAX)
    }

    /// Decodes everything in `buf` until it needs more bytes or fails, checking the limits.
    fn decode_all_within_limit(decoder: Decoder, buf: &mut BytesMut) {
        loop {
            let before = buf.len();
            match decoder.decode(buf) {
                Ok(Some(packet)) => {
                    let consumed = before - buf.len();
                    let max = decoder.max_packet_size;
                    assert!(consumed <= max, "decoded {consumed} bytes with max {max}");
                    // Non-minimal lengths and long forms of acks make the input longer than our
                    // encoding.
                    assert!(encoded_len(&packet) <= consumed);
                    let mut again = BytesMut::new();
                    encode(&packet, &mut again);
                    let unlimited = Decoder { max_packet_size: usize::MAX, ..decoder };
                    assert_eq!(unlimited.decode(&mut again), Ok(Some(packet)));
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before);
                    return;
                }
                Err(_) => return,
            }
        }
    }

    /// The round-trip properties, for one decoder and one packet.
    fn check_round_trip(decoder: Decoder, packet: &Packet) -> Result<(), TestCaseError> {
        let mut out = BytesMut::new();
        encode(packet, &mut out);
        prop_assert_eq!(out.len(), encoded_len(packet));
        let encoded = out.clone();
        let exact = Decoder { max_packet_size: encoded.len(), ..decoder };
        prop_assert_eq!(exact.decode(&mut out), Ok(Some(packet.clone())));
        prop_assert!(out.is_empty());
        if encoded.len() > 1 {
            let short = Decoder { max_packet_size: encoded.len() - 1, ..decoder };
            prop_assert_eq!(
                short.decode(&mut BytesMut::from(&encoded[..])),
                Err(DecodeError::PacketTooLarge { size: encoded.len(), max: encoded.len() - 1 })
            );
        }
        assert_split_delivery(decoder, &encoded, packet);
        Ok(())
    }

    fn check_back_to_back(
        decoder: Decoder,
        first: &Packet,
        second: &Packet,
        split: prop::sample::Index,
    ) -> Result<(), TestCaseError> {
        let mut stream = BytesMut::new();
        encode(first, &mut stream);
        encode(second, &mut stream);
        let split = split.index(stream.len() + 1);
        let mut buf = BytesMut::from(&stream[..split]);
        let mut decoded = Vec::new();
        while let Some(packet) = decoder.decode(&mut buf).unwrap() {
            decoded.push(packet);
        }
        buf.extend_from_slice(&stream[split..]);
        while let Some(packet) = decoder.decode(&mut buf).unwrap() {
            decoded.push(packet);
        }
        prop_assert_eq!(decoded, vec![first.clone(), second.clone()]);
        prop_assert!(buf.is_empty());
        Ok(())
    }

    fn mutate(packet: &Packet, edits: Vec<(prop::sample::Index, u8)>, cut: prop::sample::Index) -> BytesMut {
        let mut out = BytesMut::new();
        encode(packet, &mut out);
        for (at, value) in edits {
            let at = at.index(out.len());
            out[at] = value;
        }
        let cut = cut.index(out.len() + 1);
        BytesMut::from(&out[..cut])
    }

    proptest! {
        #[test]
        fn round_trip(packet in packet()) {
            check_round_trip(v3(), &packet)?;
        }

        #[test]
        fn round_trip_v5(packet in packet_v5()) {
            check_round_trip(v5(), &packet)?;
        }

        #[test]
        fn back_to_back_packets_split_anywhere(
            first in packet(),
            second in packet(),
            split in any::<prop::sample::Index>(),
        ) {
            check_back_to_back(v3(), &first, &second, split)?;
        }

        #[test]
        fn back_to_back_v5_packets_split_anywhere(
            first in packet_v5(),
            second in packet_v5(),
            split in any::<prop::sample::Index>(),
        ) {
            check_back_to_back(v5(), &first, &second, split)?;
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..300), max in 0usize..400) {
            let decoder = Decoder { max_packet_size: max, ..v3() };
            decode_all_within_limit(decoder, &mut BytesMut::from(&bytes[..]));
        }

        #[test]
        fn arbitrary_bytes_never_panic_v5(
            bytes in vec(any::<u8>(), 0..300),
            max in 0usize..400,
            max_user_properties in 0usize..4,
        ) {
            let decoder = Decoder { version: ProtocolVersion::V5, max_packet_size: max, max_user_properties };
            decode_all_within_limit(decoder, &mut BytesMut::from(&bytes[..]));
        }

        #[test]
        fn mutated_packets_never_panic(
            packet in packet(),
            edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
            max in 0usize..400,
        ) {
            let decoder = Decoder { max_packet_size: max, ..v3() };
            decode_all_within_limit(decoder, &mut mutate(&packet, edits, cut));
        }

        #[test]
        fn mutated_v5_packets_never_panic(
            packet in packet_v5(),
            edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
            max in 0usize..400,
            max_user_properties in 0usize..4,
        ) {
            let decoder = Decoder { version: ProtocolVersion::V5, max_packet_size: max, max_user_properties };
            decode_all_within_limit(decoder, &mut mutate(&packet, edits, cut));
        }
    }
}
