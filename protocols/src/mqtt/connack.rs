//! CONNACK: the server's answer to CONNECT (3.1.1 return code, or MQTT 5 reason code and
//! properties).

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::DecodeError;
use super::header::{expect_end, read_u8};
use super::properties::{Properties, PropertyContext};
use super::reason::ReasonCode;

/// Server → client answer to CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    /// The server resumed a stored session (always false when `code` is not `Accepted`).
    pub session_present: bool,
    /// Whether the connection is accepted, and why not.
    pub code: ConnectReturnCode,
}

/// CONNACK return code (§3.2.2.3). Anything but `Accepted` is followed by a disconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ConnectReturnCode {
    /// Connection accepted.
    Accepted = 0,
    /// Protocol level not supported by the server.
    UnacceptableProtocolVersion = 1,
    /// Client id is valid UTF-8 but not allowed by the server.
    IdentifierRejected = 2,
    /// The MQTT service is unavailable.
    ServerUnavailable = 3,
    /// Username or password malformed or wrong.
    BadUsernameOrPassword = 4,
    /// The client is not authorized to connect.
    NotAuthorized = 5,
}

impl ConnectReturnCode {
    /// Maps a wire value to a return code; `None` above 5.
    pub fn from_u8(value: u8) -> Option<ConnectReturnCode> {
        match value {
            0 => Some(ConnectReturnCode::Accepted),
            1 => Some(ConnectReturnCode::UnacceptableProtocolVersion),
            2 => Some(ConnectReturnCode::IdentifierRejected),
            3 => Some(ConnectReturnCode::ServerUnavailable),
            4 => Some(ConnectReturnCode::BadUsernameOrPassword),
            5 => Some(ConnectReturnCode::NotAuthorized),
            _ => None,
        }
    }
}

/// Server → client MQTT 5 answer to CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAckV5 {
    /// The server resumed a stored session (always false when `reason` is an error).
    pub session_present: bool,
    /// Success (0x00), or why the connection is refused (0x80 and above).
    pub reason: ReasonCode,
    /// What the server imposes: Receive Maximum, Maximum Packet Size, Topic Alias Maximum,
    /// Server Keep Alive, Assigned Client Identifier, Reason String, ...
    pub properties: Properties,
}

/// The only acknowledge flag; bits 7-1 are reserved.
const SESSION_PRESENT: u8 = 0b0000_0001;

impl ConnAck {
    pub(crate) const BODY_LEN: usize = 2;

    pub(crate) fn decode(mut body: Bytes) -> Result<Self, DecodeError> {
        let session_present = decode_flags(&mut body)?;
        let code = read_u8(&mut body)?;
        let code = ConnectReturnCode::from_u8(code).ok_or(DecodeError::InvalidConnectReturnCode(code))?;
        expect_end(&body)?;
        Ok(ConnAck { session_present, code })
    }

    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        out.put_u8(if self.session_present { SESSION_PRESENT } else { 0 });
        out.put_u8(self.code as u8);
    }
}

fn decode_flags(body: &mut Bytes) -> Result<bool, DecodeError> {
    let flags = read_u8(body)?;
    if flags & !SESSION_PRESENT != 0 {
        return Err(DecodeError::InvalidConnAckFlags);
    }
    Ok(flags & SESSION_PRESENT != 0)
}

impl ConnAckV5 {
    /// Decodes the body. A body that ends after the reason code is read as having no
    /// properties (lenient: the spec always writes the property length).
    pub(crate) fn decode(mut body: Bytes, max_user_properties: usize) -> Result<Self, DecodeError> {
        let session_present = decode_flags(&mut body)?;
        let reason = ReasonCode::decode(read_u8(&mut body)?)?;
        let properties = if body.is_empty() {
            Properties::default()
        } else {
            Properties::decode(&mut body, PropertyContext::ConnAck, max_user_properties)?
        };
        expect_end(&body)?;
        Ok(ConnAckV5 { session_present, reason, properties })
    }

    pub(crate) fn body_len(&self) -> usize {
        2 + self.properties.encoded_len()
    }

    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        out.put_u8(if self.session_present { SESSION_PRESENT } else { 0 });
        out.put_u8(self.reason as u8);
        self.properties.encode(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::codec::testing::*;
    use crate::mqtt::{Decoder, Packet, ProtocolVersion};

    #[test]
    fn accepted_with_session() {
        let bytes = [
            0x20, 0x02, // CONNACK, remaining length 2
            0x01, // session present
            0x00, // accepted
        ];
        let connack = ConnAck { session_present: true, code: ConnectReturnCode::Accepted };
        assert_fixture(&bytes, &Packet::ConnAck(connack));
    }

    #[test]
    fn every_return_code() {
        for code in 0..=5u8 {
            let bytes = [
                0x20, 0x02, // CONNACK, remaining length 2
                0x00, // no session
                code, // return code
            ];
            let connack = ConnAck { session_present: false, code: ConnectReturnCode::from_u8(code).unwrap() };
            assert_fixture(&bytes, &Packet::ConnAck(connack));
        }
        assert_eq!(ConnectReturnCode::from_u8(6), None);
    }

    #[test]
    fn reserved_flag_bits() {
        let bytes = [
            0x20, 0x02, // CONNACK, remaining length 2
            0x02, // reserved bit 1 set
            0x00, // accepted
        ];
        assert_eq!(decode_bytes(&bytes), Err(DecodeError::InvalidConnAckFlags));
    }

    #[test]
    fn unknown_return_code() {
        let bytes = [
            0x20, 0x02, // CONNACK, remaining length 2
            0x00, // no session
            0x06, // not a 3.1.1 return code
        ];
        assert_eq!(decode_bytes(&bytes), Err(DecodeError::InvalidConnectReturnCode(6)));
    }

    #[test]
    fn wrong_body_length() {
        let bytes = [
            0x20, 0x03, // CONNACK, remaining length 3
            0x00, 0x00, 0x00, // one byte too many
        ];
        assert_eq!(decode_bytes(&bytes), Err(DecodeError::TrailingBytes));
        assert_eq!(
            decode_bytes(&[0x20, 0x01, 0x00]), // CONNACK, remaining length 1
            Err(DecodeError::Truncated)
        );
    }

    fn decode_v5(bytes: &[u8]) -> Result<Option<Packet>, DecodeError> {
        Decoder::new(ProtocolVersion::V5, MAX).decode(&mut bytes::BytesMut::from(bytes))
    }

    #[test]
    fn v5_accepted_with_server_limits() {
        let bytes = [
            0x20, 0x1A, // CONNACK, remaining length 26
            0x00, // no session present
            0x00, // success
            0x17, // properties: 23 bytes
            0x12, 0x00, 0x06, b'w', b'e', b'i', b'r', b'-', b'1', // assigned client id "weir-1"
            0x13, 0x02, 0x58, // server keep alive 600 s
            0x21, 0x00, 0x0A, // receive maximum 10
            0x22, 0x00, 0x10, // topic alias maximum 16
            0x27, 0x00, 0x10, 0x00, 0x00, // maximum packet size 1 MiB
        ];
        let connack = ConnAckV5 {
            session_present: false,
            reason: ReasonCode::Success,
            properties: Properties {
                assigned_client_identifier: Some("weir-1".into()),
                server_keep_alive: Some(600),
                receive_maximum: Some(10),
                topic_alias_maximum: Some(16),
                maximum_packet_size: Some(1 << 20),
                ..Properties::default()
            },
        };
        assert_fixture_v5(&bytes, &Packet::ConnAckV5(connack));
    }

    #[test]
    fn v5_refused_with_a_reason_string() {
        let bytes = [
            0x20, 0x09, // CONNACK, remaining length 9
            0x00, // no session present
            0x89, // server busy
            0x06, // properties: 6 bytes
            0x1F, 0x00, 0x03, b'b', b'y', b'e', // reason string "bye"
        ];
        let connack = ConnAckV5 {
            session_present: false,
            reason: ReasonCode::ServerBusy,
            properties: Properties { reason_string: Some("bye".into()), ..Properties::default() },
        };
        assert_fixture_v5(&bytes, &Packet::ConnAckV5(connack));
    }

    #[test]
    fn v5_errors() {
        assert_eq!(
            decode_v5(&[
                0x20, 0x03, // CONNACK, remaining length 3
                0x00, // no session present
                0x03, // not an MQTT 5 reason code
                0x00, // no properties
            ]),
            Err(DecodeError::InvalidReasonCode(3))
        );
        assert_eq!(
            decode_v5(&[
                0x20, 0x04, // CONNACK, remaining length 4
                0x00, // no session present
                0x00, // success
                0x00, // no properties
                0xAA, // one byte too many
            ]),
            Err(DecodeError::TrailingBytes)
        );
        // The short form without a property length is read leniently.
        let short = decode_v5(&[0x20, 0x02, 0x01, 0x00]).unwrap().unwrap();
        assert_eq!(
            short,
            Packet::ConnAckV5(ConnAckV5 {
                session_present: true,
                reason: ReasonCode::Success,
                properties: Properties::default()
            })
        );
    }
}
