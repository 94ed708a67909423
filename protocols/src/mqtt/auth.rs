//! AUTH (MQTT 5 only): the enhanced-authentication exchange. weir does not support enhanced
//! authentication; it decodes AUTH so that it can answer with a clear reason code.

use bytes::{Bytes, BytesMut};

use super::codec::DecodeError;
use super::properties::{Properties, PropertyContext};
use super::reason::{decode_reason_tail, encode_reason_tail, reason_tail_len, ReasonCode};

/// Either direction: one step of enhanced authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// Success (0x00), Continue authentication (0x18) or Re-authenticate (0x19).
    pub reason: ReasonCode,
    /// Authentication Method and Data, Reason String, User Properties.
    pub properties: Properties,
}

impl Auth {
    pub(crate) fn decode(body: Bytes, max_user_properties: usize) -> Result<Self, DecodeError> {
        let (reason, properties) = decode_reason_tail(body, PropertyContext::Auth, max_user_properties)?;
        Ok(Auth { reason, properties })
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

    #[test]
    fn continue_with_method_and_data() {
        let bytes = [
            0xF0, 0x0E, // AUTH, remaining length 14
            0x18, // continue authentication
            0x0C, // properties: 12 bytes
            0x15, 0x00, 0x05, b'S', b'C', b'R', b'A', b'M', // authentication method "SCRAM"
            0x16, 0x00, 0x01, 0x07, // authentication data [7]
        ];
        let auth = Auth {
            reason: ReasonCode::ContinueAuthentication,
            properties: Properties {
                authentication_method: Some("SCRAM".into()),
                authentication_data: Some(Bytes::from_static(&[7])),
                ..Properties::default()
            },
        };
        assert_fixture_v5(&bytes, &Packet::Auth(auth));
        assert_fixture_v5(
            &[0xF0, 0x00], // AUTH, remaining length 0: success
            &Packet::Auth(Auth { reason: ReasonCode::Success, properties: Properties::default() }),
        );
    }

    #[test]
    fn auth_is_not_a_3_1_1_packet() {
        assert_eq!(decode_bytes(&[0xF0, 0x00]), Err(DecodeError::InvalidPacketType(15)));
    }
}
