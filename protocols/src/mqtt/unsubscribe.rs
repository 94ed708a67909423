//! UNSUBSCRIBE: topic filters to remove. Its answer UNSUBACK is a packet-id-only ack in 3.1.1
//! and carries a reason code per filter in MQTT 5.

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::DecodeError;
use super::header::{read_packet_id, read_string, string_field_len, write_string};
use super::properties::{Properties, PropertyContext};
use super::reason::ReasonCode;
use super::subscribe::{decode_reason_codes, validate_topic_filter};

/// Client → server: remove one or more subscriptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Non-zero packet id, echoed by the UNSUBACK.
    pub pkid: u16,
    /// At least one topic filter, as given in the SUBSCRIBE.
    pub filters: Vec<String>,
}

/// Client → server: MQTT 5 UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubscribeV5 {
    /// The fields MQTT 5 shares with 3.1.1.
    pub unsubscribe: Unsubscribe,
    /// User Properties.
    pub properties: Properties,
}

/// Server → client: MQTT 5 answer to UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAckV5 {
    /// Packet id of the UNSUBSCRIBE.
    pub pkid: u16,
    /// Reason String and User Properties.
    pub properties: Properties,
    /// One per filter, in order: Success, No subscription existed, or an error.
    pub reason_codes: Vec<ReasonCode>,
}

impl UnsubscribeV5 {
    pub(crate) fn decode(mut body: Bytes, max_user_properties: usize) -> Result<Self, DecodeError> {
        let pkid = read_packet_id(&mut body)?;
        let properties = Properties::decode(&mut body, PropertyContext::Unsubscribe, max_user_properties)?;
        let filters = Unsubscribe::decode_filters(body)?;
        Ok(UnsubscribeV5 { unsubscribe: Unsubscribe { pkid, filters }, properties })
    }

    pub(crate) fn body_len(&self) -> usize {
        self.unsubscribe.body_len() + self.properties.encoded_len()
    }

    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        out.put_u16(self.unsubscribe.pkid);
        self.properties.encode(out);
        self.unsubscribe.encode_filters(out);
    }
}

impl UnsubAckV5 {
    pub(crate) fn decode(mut body: Bytes, max_user_properties: usize) -> Result<Self, DecodeError> {
        let pkid = read_packet_id(&mut body)?;
        let properties = Properties::decode(&mut body, PropertyContext::UnsubAck, max_user_properties)?;
        Ok(UnsubAckV5 { pkid, properties, reason_codes: decode_reason_codes(&body)? })
    }

    pub(crate) fn body_len(&self) -> usize {
        2 + self.properties.encoded_len() + self.reason_codes.len()
    }

    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        out.put_u16(self.pkid);
        self.properties.encode(out);
        for code in &self.reason_codes {
            out.put_u8(*code as u8);
        }
    }
}

impl Unsubscribe {
    pub(crate) fn decode(mut body: Bytes) -> Result<Self, DecodeError> {
        let pkid = read_packet_id(&mut body)?;
        Ok(Unsubscribe { pkid, filters: Self::decode_filters(body)? })
    }

    fn decode_filters(mut body: Bytes) -> Result<Vec<String>, DecodeError> {
        let mut filters = Vec::new();
        while !body.is_empty() {
            let filter = read_string(&mut body)?;
            validate_topic_filter(&filter)?;
            filters.push(filter);
        }
        if filters.is_empty() {
            return Err(DecodeError::EmptySubscription);
        }
        Ok(filters)
    }

    pub(crate) fn body_len(&self) -> usize {
        2 + self.filters.iter().map(|filter| string_field_len(filter)).sum::<usize>()
    }

    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        out.put_u16(self.pkid);
        self.encode_filters(out);
    }

    fn encode_filters(&self, out: &mut BytesMut) {
        for filter in &self.filters {
            write_string(out, filter);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::codec::testing::*;
    use crate::mqtt::Packet;

    #[test]
    fn two_filters() {
        let bytes = [
            0xA2, 0x0B, // UNSUBSCRIBE, flags 0b0010, remaining length 11
            0x00, 0x2A, // packet id 42
            0x00, 0x03, b'a', b'/', b'+', // filter "a/+"
            0x00, 0x02, b'b', b'c', // filter "bc"
        ];
        let unsubscribe = Unsubscribe { pkid: 42, filters: vec!["a/+".to_owned(), "bc".to_owned()] };
        assert_fixture(&bytes, &Packet::Unsubscribe(unsubscribe));
    }

    #[test]
    fn errors() {
        let cases: [(&[u8], DecodeError); 5] = [
            (
                &[
                    0xA2, 0x02, // UNSUBSCRIBE, remaining length 2
                    0x00, 0x01, // packet id 1, no filter
                ],
                DecodeError::EmptySubscription,
            ),
            (
                &[
                    0xA2, 0x05, // UNSUBSCRIBE, remaining length 5
                    0x00, 0x00, // packet id 0
                    0x00, 0x01, b't', // filter "t"
                ],
                DecodeError::ZeroPacketId,
            ),
            (
                &[
                    0xA2, 0x05, // UNSUBSCRIBE, remaining length 5
                    0x00, 0x01, // packet id 1
                    0x00, 0x05, b't', // filter claims 5 bytes, has 1
                ],
                DecodeError::Truncated,
            ),
            (
                &[
                    0xA2, 0x06, // UNSUBSCRIBE, remaining length 6
                    0x00, 0x01, // packet id 1
                    0x00, 0x02, b'a', b'#', // filter "a#": '#' not alone in its level
                ],
                DecodeError::InvalidTopicFilter,
            ),
            (
                &[
                    0xA0, 0x05, // UNSUBSCRIBE with flags 0
                    0x00, 0x01, // packet id 1
                    0x00, 0x01, b't', // filter "t"
                ],
                DecodeError::InvalidHeaderFlags { packet_type: 10, flags: 0 },
            ),
        ];
        for (bytes, error) in cases {
            assert_eq!(decode_bytes(bytes), Err(error), "{bytes:02x?}");
        }
    }

    #[test]
    fn v5_unsubscribe_and_unsuback() {
        let bytes = [
            0xA2, 0x0B, // UNSUBSCRIBE, flags 0b0010, remaining length 11
            0x00, 0x03, // packet id 3
            0x05, // properties: 5 bytes
            0x26, 0x00, 0x00, 0x00, 0x00, // user property ("", "")
            0x00, 0x01, b'#', // filter "#"
        ];
        let unsubscribe = UnsubscribeV5 {
            unsubscribe: Unsubscribe { pkid: 3, filters: vec!["#".into()] },
            properties: Properties {
                user_properties: vec![(String::new(), String::new())],
                ..Properties::default()
            },
        };
        assert_fixture_v5(&bytes, &Packet::UnsubscribeV5(unsubscribe));

        let bytes = [
            0xB0, 0x05, // UNSUBACK, remaining length 5
            0x00, 0x03, // packet id 3
            0x00, // no properties
            0x11, // no subscription existed
            0x00, // success
        ];
        let unsuback = UnsubAckV5 {
            pkid: 3,
            properties: Properties::default(),
            reason_codes: vec![ReasonCode::NoSubscriptionExisted, ReasonCode::Success],
        };
        assert_fixture_v5(&bytes, &Packet::UnsubAckV5(unsuback));
        let empty = [
            0xB0, 0x03, // UNSUBACK, remaining length 3
            0x00, 0x03, // packet id 3
            0x00, // no properties, no reason code
        ];
        let decoded = crate::mqtt::Decoder::new(crate::mqtt::ProtocolVersion::V5, MAX)
            .decode(&mut bytes::BytesMut::from(&empty[..]));
        assert_eq!(decoded, Err(DecodeError::EmptySubscription));
    }
}
