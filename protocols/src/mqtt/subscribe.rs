//! SUBSCRIBE and its answer SUBACK: topic filters with requested QoS (MQTT 5: subscription
//! options), and the granted QoS (MQTT 5: a reason code per filter).

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::DecodeError;
use super::header::{read_packet_id, read_string, read_u8, string_field_len, write_string, QoS};
use super::properties::{Properties, PropertyContext};
use super::reason::ReasonCode;

/// Client → server: subscribe to one or more topic filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Non-zero packet id, echoed by the SUBACK.
    pub pkid: u16,
    /// At least one (topic filter, maximum QoS requested).
    pub filters: Vec<(String, QoS)>,
}

/// Server → client answer to SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    /// Packet id of the SUBSCRIBE.
    pub pkid: u16,
    /// One per filter, in order: the granted QoS (0, 1, 2) or `SubAck::FAILURE`.
    pub return_codes: Vec<u8>,
}

impl SubAck {
    /// Return code for a refused subscription.
    pub const FAILURE: u8 = 0x80;
}

/// Client → server: MQTT 5 SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeV5 {
    /// Non-zero packet id, echoed by the SUBACK.
    pub pkid: u16,
    /// Subscription Identifier and User Properties.
    pub properties: Properties,
    /// At least one (topic filter, options).
    pub filters: Vec<(String, SubscriptionOptions)>,
}

/// The options byte of an MQTT 5 subscription (§3.8.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionOptions {
    /// Maximum QoS the client accepts on this subscription.
    pub qos: QoS,
    /// Do not send the client its own publications.
    pub no_local: bool,
    /// Keep the RETAIN flag as published.
    pub retain_as_published: bool,
    /// 0: send retained messages on subscribe, 1: only for a new subscription, 2: never.
    pub retain_handling: u8,
}

const NO_LOCAL: u8 = 0b0000_0100;
const RETAIN_AS_PUBLISHED: u8 = 0b0000_1000;
const RETAIN_HANDLING_SHIFT: u8 = 4;
const OPTIONS_RESERVED: u8 = 0b1100_0000;

impl SubscriptionOptions {
    fn from_byte(byte: u8) -> Result<Self, DecodeError> {
        let retain_handling = (byte >> RETAIN_HANDLING_SHIFT) & 0b11;
        if byte & OPTIONS_RESERVED != 0 || retain_handling == 3 {
            return Err(DecodeError::InvalidSubscriptionOptions(byte));
        }
        let qos_bits = byte & 0b11;
        let qos = QoS::from_u8(qos_bits).ok_or(DecodeError::InvalidQoS(qos_bits))?;
        Ok(SubscriptionOptions {
            qos,
            no_local: byte & NO_LOCAL != 0,
            retain_as_published: byte & RETAIN_AS_PUBLISHED != 0,
            retain_handling,
        })
    }

    fn to_byte(self) -> u8 {
        let mut byte = self.qos as u8 | ((self.retain_handling & 0b11) << RETAIN_HANDLING_SHIFT);
        if self.no_local {
            byte |= NO_LOCAL;
        }
        if self.retain_as_published {
            byte |= RETAIN_AS_PUBLISHED;
        }
        byte
    }
}

/// Server → client: MQTT 5 answer to SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAckV5 {
    /// Packet id of the SUBSCRIBE.
    pub pkid: u16,
    /// Reason String and User Properties.
    pub properties: Properties,
    /// One per filter, in order: Granted QoS 0/1/2 or why the subscription was refused.
    pub reason_codes: Vec<ReasonCode>,
}

/// Reads the reason codes that fill the rest of a SUBACK or UNSUBACK body: at least one.
pub(crate) fn decode_reason_codes(body: &Bytes) -> Result<Vec<ReasonCode>, DecodeError> {
    if body.is_empty() {
        return Err(DecodeError::EmptySubscription);
    }
    body.iter().map(|&code| ReasonCode::decode(code)).collect()
}

impl SubscribeV5 {
    pub(crate) fn decode(mut body: Bytes, max_user_properties: usize) -> Result<Self, DecodeError> {
        let pkid = read_packet_id(&mut body)?;
        let properties = Properties::decode(&mut body, PropertyContext::Subscribe, max_user_properties)?;
        let mut filters = Vec::new();
        while !body.is_empty() {
            let filter = read_string(&mut body)?;
            validate_topic_filter(&filter)?;
            filters.push((filter, SubscriptionOptions::from_byte(read_u8(&mut body)?)?));
        }
        if filters.is_empty() {
            return Err(DecodeError::EmptySubscription);
        }
        Ok(SubscribeV5 { pkid, properties, filters })
    }

    pub(crate) fn body_len(&self) -> usize {
        let filters: usize = self.filters.iter().map(|(filter, _)| string_field_len(filter) + 1).sum();
        2 + self.properties.encoded_len() + filters
    }

    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        out.put_u16(self.pkid);
        self.properties.encode(out);
        for (filter, options) in &self.filters {
            write_string(out, filter);
            out.put_u8(options.to_byte());
        }
    }
}

impl SubAckV5 {
    pub(crate) fn decode(mut body: Bytes, max_user_properties: usize) -> Result<Self, DecodeError> {
        let pkid = read_packet_id(&mut body)?;
        let properties = Properties::decode(&mut body, PropertyContext::SubAck, max_user_properties)?;
        Ok(SubAckV5 { pkid, properties, reason_codes: decode_reason_codes(&body)? })
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

impl Subscribe {
    pub(crate) fn decode(mut body: Bytes) -> Result<Self, DecodeError> {
        let pkid = read_packet_id(&mut body)?;
        let mut filters = Vec::new();
        while !body.is_empty() {
            let filter = read_string(&mut body)?;
            validate_topic_filter(&filter)?;
            // The upper six bits are reserved, so anything above 2 is malformed [MQTT-3.8.3-4].
            let requested = read_u8(&mut body)?;
            let qos = QoS::from_u8(requested).ok_or(DecodeError::InvalidQoS(requested))?;
            filters.push((filter, qos));
        }
        if filters.is_empty() {
            return Err(DecodeError::EmptySubscription);
        }
        Ok(Subscribe { pkid, filters })
    }

    pub(crate) fn body_len(&self) -> usize {
        let filters: usize = self.filters.iter().map(|(filter, _)| string_field_len(filter) + 1).sum();
        2 + filters
    }

    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        out.put_u16(self.pkid);
        for (filter, qos) in &self.filters {
            write_string(out, filter);
            out.put_u8(*qos as u8);
        }
    }
}

impl SubAck {
    pub(crate) fn decode(mut body: Bytes) -> Result<Self, DecodeError> {
        let pkid = read_packet_id(&mut body)?;
        if body.is_empty() {
            return Err(DecodeError::EmptySubscription);
        }
        if let Some(&bad) = body.iter().find(|&&code| code > 2 && code != SubAck::FAILURE) {
            return Err(DecodeError::InvalidSubAckReturnCode(bad));
        }
        Ok(SubAck { pkid, return_codes: body.to_vec() })
    }

    pub(crate) fn body_len(&self) -> usize {
        2 + self.return_codes.len()
    }

    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        out.put_u16(self.pkid);
        out.put_slice(&self.return_codes);
    }
}

/// A topic filter is non-empty; '+' fills a whole level, '#' fills the last one (§4.7.1).
pub(crate) fn validate_topic_filter(filter: &str) -> Result<(), DecodeError> {
    if filter.is_empty() {
        return Err(DecodeError::ZeroLengthTopic);
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let valid = match level {
            "#" => levels.peek().is_none(),
            "+" => true,
            _ => !level.contains(['+', '#']),
        };
        if !valid {
            return Err(DecodeError::InvalidTopicFilter);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::codec::testing::*;
    use crate::mqtt::Packet;

    #[test]
    fn subscribe_two_filters() {
        let bytes = [
            0x82, 0x0E, // SUBSCRIBE, flags 0b0010, remaining length 14
            0x00, 0x01, // packet id 1
            0x00, 0x03, b'a', b'/', b'+', // filter "a/+"
            0x01, // QoS 1
            0x00, 0x03, b'b', b'/', b'#', // filter "b/#"
            0x02, // QoS 2
        ];
        let subscribe = Subscribe {
            pkid: 1,
            filters: vec![("a/+".to_owned(), QoS::AtLeastOnce), ("b/#".to_owned(), QoS::ExactlyOnce)],
        };
        assert_fixture(&bytes, &Packet::Subscribe(subscribe));
    }

    #[test]
    fn suback() {
        let bytes = [
            0x90, 0x05, // SUBACK, remaining length 5
            0x00, 0x01, // packet id 1
            0x01, // granted QoS 1
            0x80, // failure
            0x00, // granted QoS 0
        ];
        let suback = SubAck { pkid: 1, return_codes: vec![1, SubAck::FAILURE, 0] };
        assert_fixture(&bytes, &Packet::SubAck(suback));
    }

    #[test]
    fn subscribe_flags_must_be_0010() {
        let bytes = [
            0x80, 0x06, // SUBSCRIBE with flags 0
            0x00, 0x01, // packet id 1
            0x00, 0x01, b't', // filter "t"
            0x00, // QoS 0
        ];
        assert_eq!(decode_bytes(&bytes), Err(DecodeError::InvalidHeaderFlags { packet_type: 8, flags: 0 }));
    }

    #[test]
    fn subscribe_errors() {
        let cases: [(&[u8], DecodeError); 6] = [
            (
                &[
                    0x82, 0x02, // SUBSCRIBE, remaining length 2
                    0x00, 0x01, // packet id 1, no filter
                ],
                DecodeError::EmptySubscription,
            ),
            (
                &[
                    0x82, 0x06, // SUBSCRIBE, remaining length 6
                    0x00, 0x00, // packet id 0
                    0x00, 0x01, b't', 0x00, // filter "t", QoS 0
                ],
                DecodeError::ZeroPacketId,
            ),
            (
                &[
                    0x82, 0x06, // SUBSCRIBE, remaining length 6
                    0x00, 0x01, // packet id 1
                    0x00, 0x01, b't', 0x03, // filter "t", QoS 3
                ],
                DecodeError::InvalidQoS(3),
            ),
            (
                &[
                    0x82, 0x05, // SUBSCRIBE, remaining length 5
                    0x00, 0x01, // packet id 1
                    0x00, 0x01, b't', // filter "t", QoS byte missing
                ],
                DecodeError::Truncated,
            ),
            (
                &[
                    0x82, 0x05, // SUBSCRIBE, remaining length 5
                    0x00, 0x01, // packet id 1
                    0x00, 0x00, 0x00, // empty filter, QoS 0
                ],
                DecodeError::ZeroLengthTopic,
            ),
            (
                &[
                    0x82, 0x07, // SUBSCRIBE, remaining length 7
                    0x00, 0x01, // packet id 1
                    0x00, 0x02, b'#', b'/', 0x00, // filter "#/" ('#' not last), QoS 0
                ],
                DecodeError::InvalidTopicFilter,
            ),
        ];
        for (bytes, error) in cases {
            assert_eq!(decode_bytes(bytes), Err(error), "{bytes:02x?}");
        }
    }

    #[test]
    fn suback_errors() {
        let empty = [
            0x90, 0x02, // SUBACK, remaining length 2
            0x00, 0x01, // packet id 1, no return code
        ];
        assert_eq!(decode_bytes(&empty), Err(DecodeError::EmptySubscription));
        let bad_code = [
            0x90, 0x03, // SUBACK, remaining length 3
            0x00, 0x01, // packet id 1
            0x03, // not a return code
        ];
        assert_eq!(decode_bytes(&bad_code), Err(DecodeError::InvalidSubAckReturnCode(3)));
        let zero_id = [
            0x90, 0x03, // SUBACK, remaining length 3
            0x00, 0x00, // packet id 0
            0x00, // granted QoS 0
        ];
        assert_eq!(decode_bytes(&zero_id), Err(DecodeError::ZeroPacketId));
    }

    #[test]
    fn topic_filters() {
        for valid in ["a", "/", "+", "#", "a/+/b", "+/+", "a/#", "/#", "a//b", "é/+"] {
            assert_eq!(validate_topic_filter(valid), Ok(()), "{valid}");
        }
        for invalid in ["a+", "a/b+", "#/a", "a/#/b", "a#", "+a/b", "##"] {
            assert_eq!(validate_topic_filter(invalid), Err(DecodeError::InvalidTopicFilter), "{invalid}");
        }
        assert_eq!(validate_topic_filter(""), Err(DecodeError::ZeroLengthTopic));
    }

    fn decode_v5(bytes: &[u8]) -> Result<Option<Packet>, DecodeError> {
        crate::mqtt::Decoder::new(crate::mqtt::ProtocolVersion::V5, MAX)
            .decode(&mut bytes::BytesMut::from(bytes))
    }

    #[test]
    fn v5_subscribe_with_options_and_identifier() {
        let bytes = [
            0x82, 0x0F, // SUBSCRIBE, flags 0b0010, remaining length 15
            0x00, 0x02, // packet id 2
            0x02, // properties: 2 bytes
            0x0B, 0x07, // subscription identifier 7
            0x00, 0x03, b'a', b'/', b'+', // filter "a/+"
            0x2D, // retain handling 2, retain as published, no local, QoS 1
            0x00, 0x01, b'b', // filter "b"
            0x00, // all options off, QoS 0
        ];
        let subscribe = SubscribeV5 {
            pkid: 2,
            properties: Properties { subscription_identifiers: vec![7], ..Properties::default() },
            filters: vec![
                (
                    "a/+".into(),
                    SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        no_local: true,
                        retain_as_published: true,
                        retain_handling: 2,
                    },
                ),
                (
                    "b".into(),
                    SubscriptionOptions {
                        qos: QoS::AtMostOnce,
                        no_local: false,
                        retain_as_published: false,
                        retain_handling: 0,
                    },
                ),
            ],
        };
        assert_fixture_v5(&bytes, &Packet::SubscribeV5(subscribe));
    }

    #[test]
    fn v5_suback() {
        let bytes = [
            0x90, 0x0A, // SUBACK, remaining length 10
            0x00, 0x02, // packet id 2
            0x05, // properties: 5 bytes
            0x1F, 0x00, 0x02, b'n', b'o', // reason string "no"
            0x83, // implementation specific error
            0x01, // granted QoS 1
        ];
        let suback = SubAckV5 {
            pkid: 2,
            properties: Properties { reason_string: Some("no".into()), ..Properties::default() },
            reason_codes: vec![ReasonCode::ImplementationSpecificError, ReasonCode::GrantedQoS1],
        };
        assert_fixture_v5(&bytes, &Packet::SubAckV5(suback));
    }

    #[test]
    fn v5_subscribe_errors() {
        let cases: [(&[u8], DecodeError); 4] = [
            (
                &[
                    0x82, 0x07, // SUBSCRIBE, remaining length 7
                    0x00, 0x01, // packet id 1
                    0x00, // no properties
                    0x00, 0x01, b't', 0x40, // filter "t", reserved option bit 6
                ],
                DecodeError::InvalidSubscriptionOptions(0x40),
            ),
            (
                &[
                    0x82, 0x07, // SUBSCRIBE, remaining length 7
                    0x00, 0x01, // packet id 1
                    0x00, // no properties
                    0x00, 0x01, b't', 0x30, // filter "t", retain handling 3
                ],
                DecodeError::InvalidSubscriptionOptions(0x30),
            ),
            (
                &[
                    0x82, 0x03, // SUBSCRIBE, remaining length 3
                    0x00, 0x01, // packet id 1
                    0x00, // no properties, no filter
                ],
                DecodeError::EmptySubscription,
            ),
            (
                &[
                    0x90, 0x04, // SUBACK, remaining length 4
                    0x00, 0x01, // packet id 1
                    0x00, // no properties
                    0x03, // not a reason code
                ],
                DecodeError::InvalidReasonCode(3),
            ),
        ];
        for (bytes, error) in cases {
            assert_eq!(decode_v5(bytes), Err(error), "{bytes:02x?}");
        }
    }
}
