//! CONNECT: the client's first packet, with its identity, session options, will and credentials.
//! It names its own protocol level, so it decodes the same way on every connection; an MQTT 5
//! CONNECT also carries properties, and its will has properties of its own.

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::{DecodeError, Packet};
use super::header::{
    bytes_field_len, expect_end, read_bytes, read_string, read_u16, read_u8, string_field_len, write_bytes,
    write_string, QoS,
};
use super::properties::{Properties, PropertyContext};
use super::publish::validate_topic_name;

/// Client → server: opens a session. For MQTT 5 it is the core of a [`ConnectV5`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// 3 for MQTT 3.1 ("MQIsdp"), 4 for MQTT 3.1.1 ("MQTT"), 5 inside a [`ConnectV5`]; selects
    /// the protocol name on encode.
    pub protocol_level: u8,
    /// Discard any previous session and do not keep this one after disconnect (MQTT 5: Clean
    /// Start).
    pub clean_session: bool,
    /// Longest silence the client promises between two packets; 0 disables the keepalive.
    pub keep_alive_secs: u16,
    /// May be empty (the server then assigns one or rejects, see §3.1.3.1).
    pub client_id: String,
    /// Message the server publishes if the connection is lost without DISCONNECT.
    pub will: Option<Will>,
    /// Username, if any.
    pub username: Option<String>,
    /// Password, if any; 3.1.1 requires a username with it.
    pub password: Option<Bytes>,
}

/// Client → server: an MQTT 5 CONNECT (protocol level 5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectV5 {
    /// The fields MQTT 5 shares with 3.1.1; `protocol_level` is 5.
    pub connect: Connect,
    /// CONNECT properties (session expiry, receive maximum, maximum packet size, ...).
    pub properties: Properties,
    /// Will properties; written only when `connect.will` is set.
    pub will_properties: Properties,
}

/// The last will of a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// Topic name: non-empty, no wildcards.
    pub topic: String,
    /// Message body.
    pub payload: Bytes,
    /// QoS of the will publication.
    pub qos: QoS,
    /// Publish the will as a retained message.
    pub retain: bool,
}

const NAME_V3: &[u8] = b"MQIsdp";
const NAME_V4: &[u8] = b"MQTT";
/// Longest protocol name kept in `InvalidProtocolName`, for logs.
const NAME_IN_ERROR_MAX: usize = 32;

// Connect flags (§3.1.2.3).
const RESERVED: u8 = 0b0000_0001;
const CLEAN_SESSION: u8 = 0b0000_0010;
const WILL: u8 = 0b0000_0100;
const WILL_QOS_SHIFT: u8 = 3;
const WILL_QOS: u8 = 0b0001_1000;
const WILL_RETAIN: u8 = 0b0010_0000;
const PASSWORD: u8 = 0b0100_0000;
const USERNAME: u8 = 0b1000_0000;

/// Decodes a CONNECT body of any supported level: `Packet::Connect` for 3.1 and 3.1.1,
/// `Packet::ConnectV5` for 5. At most `max_user_properties` User Properties in the CONNECT and
/// its will together.
pub(crate) fn decode(mut body: Bytes, max_user_properties: usize) -> Result<Packet, DecodeError> {
    // Name and level come first: an unsupported level must be answered with CONNACK 0x01,
    // whatever follows it.
    let name = read_bytes(&mut body)?;
    let protocol_level = read_u8(&mut body)?;
    let supported = match &name[..] {
        NAME_V4 => protocol_level == 4 || protocol_level == 5,
        NAME_V3 => protocol_level == 3,
        other => {
            let shown = &other[..other.len().min(NAME_IN_ERROR_MAX)];
            let shown = String::from_utf8_lossy(shown).into_owned();
            return Err(DecodeError::InvalidProtocolName(shown));
        }
    };
    if !supported {
        return Err(DecodeError::UnsupportedProtocolLevel(protocol_level));
    }
    let v5 = protocol_level == 5;

    let flags = read_u8(&mut body)?;
    let has_will = flags & WILL != 0;
    let has_username = flags & USERNAME != 0;
    let has_password = flags & PASSWORD != 0;
    if flags & RESERVED != 0
        // Will QoS and retain must be 0 without a will [MQTT-3.1.2-13, 3.1.2-15].
        || (!has_will && flags & (WILL_QOS | WILL_RETAIN) != 0)
        // No password without username in 3.1.1 [MQTT-3.1.2-22]; 3.1 and 5 allow it.
        || (protocol_level == 4 && has_password && !has_username)
    {
        return Err(DecodeError::MalformedConnectFlags);
    }
    let will_qos_bits = (flags & WILL_QOS) >> WILL_QOS_SHIFT;
    let will_qos = QoS::from_u8(will_qos_bits).ok_or(DecodeError::InvalidQoS(will_qos_bits))?;

    let keep_alive_secs = read_u16(&mut body)?;
    let properties = if v5 {
        Properties::decode(&mut body, PropertyContext::Connect, max_user_properties)?
    } else {
        Properties::default()
    };
    let client_id = read_string(&mut body)?;
    let mut will_properties = Properties::default();
    // Will payload and password live as long as the session: copy them rather than pin
    // the whole read buffer they were sliced from.
    let will = if has_will {
        if v5 {
            let budget = max_user_properties - properties.user_properties.len();
            will_properties = Properties::decode(&mut body, PropertyContext::Will, budget).map_err(
                |error| match error {
                    DecodeError::TooManyUserProperties { .. } => {
                        DecodeError::TooManyUserProperties { max: max_user_properties }
                    }
                    other => other,
                },
            )?;
        }
        let topic = read_string(&mut body)?;
        validate_topic_name(&topic)?;
        Some(Will {
            topic,
            payload: Bytes::copy_from_slice(&read_bytes(&mut body)?),
            qos: will_qos,
            retain: flags & WILL_RETAIN != 0,
        })
    } else {
        None
    };
    let username = has_username.then(|| read_string(&mut body)).transpose()?;
    let password =
        has_password.then(|| read_bytes(&mut body).map(|raw| Bytes::copy_from_slice(&raw))).transpose()?;
    expect_end(&body)?;

    let connect = Connect {
        protocol_level,
        clean_session: flags & CLEAN_SESSION != 0,
        keep_alive_secs,
        client_id,
        will,
        username,
        password,
    };
    Ok(if v5 {
        Packet::ConnectV5(Box::new(ConnectV5 { connect, properties, will_properties }))
    } else {
        Packet::Connect(connect)
    })
}

impl Connect {
    fn protocol_name(&self) -> &'static [u8] {
        if self.protocol_level == 3 {
            NAME_V3
        } else {
            NAME_V4
        }
    }

    fn flags(&self) -> u8 {
        let mut flags = 0;
        if self.clean_session {
            flags |= CLEAN_SESSION;
        }
        if let Some(will) = &self.will {
            flags |= WILL | ((will.qos as u8) << WILL_QOS_SHIFT);
            if will.retain {
                flags |= WILL_RETAIN;
            }
        }
        if self.username.is_some() {
            flags |= USERNAME;
        }
        if self.password.is_some() {
            flags |= PASSWORD;
        }
        flags
    }

    /// Body size; `v5` holds the CONNECT and will properties of an MQTT 5 CONNECT.
    pub(crate) fn body_len(&self, v5: Option<(&Properties, &Properties)>) -> usize {
        let will = self.will.as_ref().map_or(0, |will| {
            string_field_len(&will.topic)
                + bytes_field_len(&will.payload)
                + v5.map_or(0, |(_, will_properties)| will_properties.encoded_len())
        });
        bytes_field_len(self.protocol_name())
            + 1 // level
            + 1 // flags
            + 2 // keep alive
            + v5.map_or(0, |(properties, _)| properties.encoded_len())
            + string_field_len(&self.client_id)
            + will
            + self.username.as_deref().map_or(0, string_field_len)
            + self.password.as_deref().map_or(0, bytes_field_len)
    }

    /// Writes the body; `v5` as for [`Connect::body_len`] (the level byte is then 5).
    pub(crate) fn encode_body(&self, out: &mut BytesMut, v5: Option<(&Properties, &Properties)>) {
        write_bytes(out, self.protocol_name());
        out.put_u8(if v5.is_some() { 5 } else { self.protocol_level });
        out.put_u8(self.flags());
        out.put_u16(self.keep_alive_secs);
        if let Some((properties, _)) = v5 {
            properties.encode(out);
        }
        write_string(out, &self.client_id);
        if let Some(will) = &self.will {
            if let Some((_, will_properties)) = v5 {
                will_properties.encode(out);
            }
            write_string(out, &will.topic);
            write_bytes(out, &will.payload);
        }
        if let Some(username) = &self.username {
            write_string(out, username);
        }
        if let Some(password) = &self.password {
            write_bytes(out, password);
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;
    use crate::mqtt::codec::testing::*;
    use crate::mqtt::{Decoder, ProtocolVersion};

    fn minimal(protocol_level: u8) -> Connect {
        Connect {
            protocol_level,
            clean_session: true,
            keep_alive_secs: 60,
            client_id: "d1".to_owned(),
            will: None,
            username: None,
            password: None,
        }
    }

    #[test]
    fn minimal_v311() {
        let bytes = [
            0x10, 0x0E, // CONNECT, remaining length 14
            0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
            0x04, // level 4 (3.1.1)
            0x02, // flags: clean session
            0x00, 0x3C, // keep alive 60 s
            0x00, 0x02, b'd', b'1', // client id "d1"
        ];
        assert_fixture(&bytes, &Packet::Connect(minimal(4)));
    }

    #[test]
    fn minimal_v31() {
        let bytes = [
            0x10, 0x10, // CONNECT, remaining length 16
            0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', // protocol name "MQIsdp"
            0x03, // level 3 (3.1)
            0x02, // flags: clean session
            0x00, 0x3C, // keep alive 60 s
            0x00, 0x02, b'd', b'1', // client id "d1"
        ];
        assert_fixture(&bytes, &Packet::Connect(minimal(3)));
    }

    #[test]
    fn will_and_credentials() {
        let bytes = [
            0x10, 0x20, // CONNECT, remaining length 32
            0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
            0x04, // level 4
            0xF4, // flags: username, password, will retain, will QoS 2, will; no clean session
            0x00, 0x00, // keep alive disabled
            0x00, 0x00, // empty client id
            0x00, 0x03, b'w', b'/', b't', // will topic "w/t"
            0x00, 0x04, b'g', b'o', b'n', b'e', // will payload "gone"
            0x00, 0x02, b'u', b'1', // username "u1"
            0x00, 0x03, 0x00, 0xFF, 0x01, // password: any bytes
        ];
        let connect = Connect {
            protocol_level: 4,
            clean_session: false,
            keep_alive_secs: 0,
            client_id: String::new(),
            will: Some(Will {
                topic: "w/t".to_owned(),
                payload: Bytes::from_static(b"gone"),
                qos: QoS::ExactlyOnce,
                retain: true,
            }),
            username: Some("u1".to_owned()),
            password: Some(Bytes::from_static(&[0x00, 0xFF, 0x01])),
        };
        assert_fixture(&bytes, &Packet::Connect(connect));
    }

    #[test]
    fn minimal_v5() {
        let bytes = [
            0x10, 0x0F, // CONNECT, remaining length 15
            0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
            0x05, // level 5
            0x02, // flags: clean start
            0x00, 0x3C, // keep alive 60 s
            0x00, // properties: none
            0x00, 0x02, b'd', b'1', // client id "d1"
        ];
        let connect = ConnectV5 {
            connect: minimal(5),
            properties: Properties::default(),
            will_properties: Properties::default(),
        };
        assert_fixture(&bytes, &Packet::ConnectV5(Box::new(connect)));
    }

    #[test]
    fn v5_with_properties_will_properties_and_password_only() {
        let bytes = [
            0x10, 0x2B, // CONNECT, remaining length 43
            0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
            0x05, // level 5
            0x4E, // flags: password, will QoS 1, will, clean start (no username: fine in 5)
            0x00, 0x0A, // keep alive 10 s
            0x0D, // properties: 13 bytes
            0x11, 0x00, 0x00, 0x0E, 0x10, // session expiry interval 3600 s
            0x21, 0x00, 0x14, // receive maximum 20
            0x27, 0x00, 0x00, 0x40, 0x00, // maximum packet size 16,384
            0x00, 0x00, // empty client id
            0x05, // will properties: 5 bytes
            0x18, 0x00, 0x00, 0x00, 0x05, // will delay interval 5 s
            0x00, 0x01, b'w', // will topic "w"
            0x00, 0x02, b'b', b'y', // will payload "by"
            0x00, 0x02, b'p', b'w', // password "pw"
        ];
        let connect = ConnectV5 {
            connect: Connect {
                protocol_level: 5,
                clean_session: true,
                keep_alive_secs: 10,
                client_id: String::new(),
                will: Some(Will {
                    topic: "w".into(),
                    payload: Bytes::from_static(b"by"),
                    qos: QoS::AtLeastOnce,
                    retain: false,
                }),
                username: None,
                password: Some(Bytes::from_static(b"pw")),
            },
            properties: Properties {
                session_expiry_interval: Some(3600),
                receive_maximum: Some(20),
                maximum_packet_size: Some(16_384),
                ..Properties::default()
            },
            will_properties: Properties { will_delay_interval: Some(5), ..Properties::default() },
        };
        assert_fixture(&bytes, &Packet::ConnectV5(Box::new(connect)));
    }

    #[test]
    fn v5_connect_and_will_share_the_user_property_cap() {
        let bytes = [
            0x10, 0x1D, // CONNECT, remaining length 29
            0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
            0x05, // level 5
            0x06, // flags: will QoS 0, will, clean start
            0x00, 0x0A, // keep alive 10 s
            0x05, // properties: 5 bytes
            0x26, 0x00, 0x00, 0x00, 0x00, // user property ("", "")
            0x00, 0x00, // empty client id
            0x05, // will properties: 5 bytes
            0x26, 0x00, 0x00, 0x00, 0x00, // user property ("", "")
            0x00, 0x01, b'w', // will topic "w"
            0x00, 0x00, // empty will payload
        ];
        let decode_with_cap = |max| {
            Decoder { max_user_properties: max, ..Decoder::new(ProtocolVersion::V311, MAX) }
                .decode(&mut BytesMut::from(&bytes[..]))
        };
        assert!(matches!(decode_with_cap(2), Ok(Some(Packet::ConnectV5(_)))));
        assert_eq!(decode_with_cap(1), Err(DecodeError::TooManyUserProperties { max: 1 }));
    }

    #[test]
    fn v5_properties_are_checked() {
        let bytes = [
            0x10, 0x13, // CONNECT, remaining length 19
            0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
            0x05, // level 5
            0x02, // flags: clean start
            0x00, 0x3C, // keep alive 60 s
            0x04, // properties: 4 bytes
            0x23, 0x00, 0x01, // topic alias 1: a PUBLISH property
            0xAA, // one more byte of the property list
            0x00, 0x02, b'd', b'1', // client id "d1"
        ];
        assert_eq!(
            decode_bytes(&bytes),
            Err(DecodeError::PropertyNotAllowed { property: 0x23, packet: "CONNECT" })
        );
    }

    #[test]
    fn level_5_is_mqtt_only() {
        let bytes = [
            0x10, 0x09, // CONNECT, remaining length 9
            0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', // protocol name "MQIsdp"
            0x05, // level 5 does not go with "MQIsdp"
        ];
        assert_eq!(decode_bytes(&bytes), Err(DecodeError::UnsupportedProtocolLevel(5)));
    }

    #[test]
    fn level_must_match_the_name() {
        let bytes = [
            0x10, 0x07, // CONNECT, remaining length 7
            0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
            0x03, // level 3 belongs to "MQIsdp"; nothing else needed
        ];
        assert_eq!(decode_bytes(&bytes), Err(DecodeError::UnsupportedProtocolLevel(3)));
    }

    #[test]
    fn invalid_protocol_name() {
        let bytes = [
            0x10, 0x07, // CONNECT, remaining length 7
            0x00, 0x04, b'H', b'T', b'T', b'P', // protocol name "HTTP"
            0x04, // level 4
        ];
        assert_eq!(decode_bytes(&bytes), Err(DecodeError::InvalidProtocolName("HTTP".to_owned())));
    }

    /// A v3.1.1 CONNECT with the given flags byte and payload after the client id "d1".
    fn with_flags(flags: u8, rest: &[u8]) -> Vec<u8> {
        let mut bytes = vec![
            0x10,
            0x0E + rest.len() as u8, // CONNECT, remaining length
            0x00,
            0x04,
            b'M',
            b'Q',
            b'T',
            b'T', // protocol name "MQTT"
            0x04, // level 4
            flags,
            0x00,
            0x3C, // keep alive 60 s
            0x00,
            0x02,
            b'd',
            b'1', // client id "d1"
        ];
        bytes.extend_from_slice(rest);
        bytes
    }

    #[test]
    fn malformed_flags() {
        for flags in [
            0b0000_0011, // reserved bit
            0b0000_1010, // will QoS 1 without will flag
            0b0010_0010, // will retain without will flag
            0b0100_0010, // password without username
        ] {
            assert_eq!(
                decode_bytes(&with_flags(flags, &[])),
                Err(DecodeError::MalformedConnectFlags),
                "flags {flags:#010b}"
            );
        }
    }

    #[test]
    fn v31_allows_password_without_username() {
        let bytes = [
            0x10, 0x14, // CONNECT, remaining length 20
            0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', // protocol name "MQIsdp"
            0x03, // level 3
            0x40, // flags: password only
            0x00, 0x3C, // keep alive 60 s
            0x00, 0x02, b'd', b'1', // client id "d1"
            0x00, 0x02, b'p', b'w', // password "pw"
        ];
        let connect =
            Connect { clean_session: false, password: Some(Bytes::from_static(b"pw")), ..minimal(3) };
        assert_fixture(&bytes, &Packet::Connect(connect));
    }

    #[test]
    fn will_qos_3() {
        let rest = [
            0x00, 0x01, b't', // will topic "t"
            0x00, 0x00, // empty will payload
        ];
        assert_eq!(
            decode_bytes(&with_flags(0b0001_1110, &rest)), // will, will QoS 3, clean session
            Err(DecodeError::InvalidQoS(3))
        );
    }

    #[test]
    fn zero_length_will_topic() {
        let rest = [
            0x00, 0x00, // empty will topic
            0x00, 0x00, // empty will payload
        ];
        assert_eq!(
            decode_bytes(&with_flags(0b0000_0110, &rest)), // will QoS 0, clean session
            Err(DecodeError::ZeroLengthTopic)
        );
    }

    #[test]
    fn will_topic_is_a_topic_name() {
        let rest = [
            0x00, 0x01, b'#', // will topic "#"
            0x00, 0x00, // empty will payload
        ];
        assert_eq!(
            decode_bytes(&with_flags(0b0000_0110, &rest)), // will QoS 0, clean session
            Err(DecodeError::WildcardInTopic)
        );
    }

    #[test]
    fn client_id_with_bad_utf8() {
        let bytes = [
            0x10, 0x0E, // CONNECT, remaining length 14
            0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
            0x04, // level 4
            0x02, // flags: clean session
            0x00, 0x3C, // keep alive 60 s
            0x00, 0x02, 0xC0, 0x80, // overlong encoding of U+0000
        ];
        assert_eq!(decode_bytes(&bytes), Err(DecodeError::InvalidUtf8));
    }

    #[test]
    fn field_running_past_the_body() {
        let bytes = [
            0x10, 0x0E, // CONNECT, remaining length 14
            0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
            0x04, // level 4
            0x82, // flags: username, clean session
            0x00, 0x3C, // keep alive 60 s
            0x00, 0x02, b'd', b'1', // client id "d1", then no username
        ];
        assert_eq!(decode_bytes(&bytes), Err(DecodeError::Truncated));
        assert_eq!(
            decode_bytes(&[0x10, 0x02, 0x00, 0x04]), // name claims 4 bytes, body has none
            Err(DecodeError::Truncated)
        );
    }

    #[test]
    fn trailing_bytes() {
        assert_eq!(
            decode_bytes(&with_flags(0x02, &[0xAA])), // one byte after the client id
            Err(DecodeError::TrailingBytes)
        );
    }
}
