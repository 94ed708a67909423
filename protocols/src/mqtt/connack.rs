//! CONNACK: the server's answer to CONNECT.

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::DecodeError;
use super::header::{expect_end, read_u8};

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

/// The only acknowledge flag; bits 7-1 are reserved.
const SESSION_PRESENT: u8 = 0b0000_0001;

impl ConnAck {
    pub(crate) const BODY_LEN: usize = 2;

    pub(crate) fn decode(mut body: Bytes) -> Result<Self, DecodeError> {
        let flags = read_u8(&mut body)?;
        if flags & !SESSION_PRESENT != 0 {
            return Err(DecodeError::InvalidConnAckFlags);
        }
        let code = read_u8(&mut body)?;
        let code = ConnectReturnCode::from_u8(code).ok_or(DecodeError::InvalidConnectReturnCode(code))?;
        expect_end(&body)?;
        Ok(ConnAck { session_present: flags & SESSION_PRESENT != 0, code })
    }

    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        out.put_u8(if self.session_present { SESSION_PRESENT } else { 0 });
        out.put_u8(self.code as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::codec::testing::*;
    use crate::mqtt::Packet;

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
}
