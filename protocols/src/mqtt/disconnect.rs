//! DISCONNECT in MQTT 5: either side closes, saying why with a reason code and properties.
//! (The 3.1.1 DISCONNECT has no body and is `Packet::Disconnect`.)

use bytes::{Bytes, BytesMut};

use super::codec::DecodeError;
use super::properties::{Properties, PropertyContext};
use super::reason::{decode_reason_tail, encode_reason_tail, reason_tail_len, ReasonCode};

/// Either direction: the connection is about to close, and why. Encoded in its shortest form
/// (an empty body for a normal disconnection without properties).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisconnectV5 {
    /// Normal disconnection (0x00), Disconnect with Will Message (0x04), or an error.
    pub reason: ReasonCode,
    /// Session Expiry Interval (client only), Reason String, Server Reference, User Properties.
    pub properties: Properties,
}

impl DisconnectV5 {
    /// A DISCONNECT with `reason` and a Reason String.
    pub fn with_reason_string(reason: ReasonCode, text: impl Into<String>) -> Self {
        Self { reason, properties: Properties { reason_string: Some(text.into()), ..Properties::default() } }
    }

    pub(crate) fn decode(body: Bytes, max_user_properties: usize) -> Result<Self, DecodeError> {
        let (reason, properties) =
            decode_reason_tail(body, PropertyContext::Disconnect, max_user_properties)?;
        Ok(DisconnectV5 { reason, properties })
    }

    pub(crate) fn body_len(&self) -> usize {
        reason_tail_len(self.reason, &self.properties)
    }

    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        encode_reason_tail(self.reason, &self.properties, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::codec::testing::*;
    use crate::mqtt::Packet;

    fn disconnect(reason: ReasonCode, properties: Properties) -> Packet {
        Packet::DisconnectV5(DisconnectV5 { reason, properties })
    }

    #[test]
    fn normal_disconnection_is_an_empty_body() {
        let bytes = [
            0xE0, 0x00, // DISCONNECT, remaining length 0: normal disconnection
        ];
        assert_fixture_v5(&bytes, &disconnect(ReasonCode::Success, Properties::default()));
    }

    #[test]
    fn reason_code_only() {
        let bytes = [
            0xE0, 0x01, // DISCONNECT, remaining length 1
            0x93, // receive maximum exceeded
        ];
        assert_fixture_v5(&bytes, &disconnect(ReasonCode::ReceiveMaximumExceeded, Properties::default()));
    }

    #[test]
    fn reason_code_and_properties() {
        let bytes = [
            0xE0, 0x0C, // DISCONNECT, remaining length 12
            0x95, // packet too large
            0x0A, // properties: 10 bytes
            0x11, 0x00, 0x00, 0x00, 0x00, // session expiry interval 0
            0x1F, 0x00, 0x02, b'b', b'g', // reason string "bg"
        ];
        let properties = Properties {
            reason_string: Some("bg".into()),
            session_expiry_interval: Some(0),
            ..Properties::default()
        };
        assert_fixture_v5(&bytes, &disconnect(ReasonCode::PacketTooLarge, properties));
    }

    #[test]
    fn errors() {
        let decode_v5 = |bytes: &[u8]| {
            crate::mqtt::Decoder::new(crate::mqtt::ProtocolVersion::V5, MAX)
                .decode(&mut bytes::BytesMut::from(bytes))
        };
        assert_eq!(
            decode_v5(&[
                0xE0, 0x01, // DISCONNECT, remaining length 1
                0x05, // not a reason code
            ]),
            Err(DecodeError::InvalidReasonCode(5))
        );
        assert_eq!(
            decode_v5(&[
                0xE0, 0x04, // DISCONNECT, remaining length 4
                0x00, // normal disconnection
                0x02, 0x24, 0x01, // maximum QoS: a CONNACK property
            ]),
            Err(DecodeError::PropertyNotAllowed { property: 0x24, packet: "DISCONNECT" })
        );
        assert_eq!(
            decode_v5(&[
                0xE0, 0x03, // DISCONNECT, remaining length 3
                0x00, // normal disconnection
                0x00, // no properties
                0x00, // one byte too many
            ]),
            Err(DecodeError::TrailingBytes)
        );
    }
}
