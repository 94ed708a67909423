//! MQTT 5 properties (§2.2.2): a variable-byte-integer length, then (identifier, value) pairs.
//! One struct holds every property MQTT 5 defines; which ones a packet may carry is checked on
//! decode. A property given twice (other than User Property, and Subscription Identifier in a
//! PUBLISH) is a protocol error; an identifier MQTT 5 does not define is malformed.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::codec::DecodeError;
use super::header::{
    bytes_field_len, read_bytes, read_string, read_u16, read_u32, read_u8, read_variable_int,
    string_field_len, variable_int_len, write_bytes, write_string, write_variable_int, MAX_REMAINING_LENGTH,
};

/// Property identifiers (§2.2.2.2).
pub(crate) mod id {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

/// The property list of one MQTT 5 packet (or of a CONNECT's will). `None` / empty means the
/// property is absent, which the spec gives a default meaning for each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    /// 0x01: 0 = unspecified bytes, 1 = UTF-8 text. PUBLISH, will.
    pub payload_format_indicator: Option<u8>,
    /// 0x02: seconds. PUBLISH, will.
    pub message_expiry_interval: Option<u32>,
    /// 0x03: MIME type of the payload. PUBLISH, will.
    pub content_type: Option<String>,
    /// 0x08: PUBLISH, will.
    pub response_topic: Option<String>,
    /// 0x09: PUBLISH, will.
    pub correlation_data: Option<Bytes>,
    /// 0x0B: 1..=268,435,455. Several in a server's PUBLISH, one in SUBSCRIBE.
    pub subscription_identifiers: Vec<u32>,
    /// 0x11: seconds. CONNECT, CONNACK, DISCONNECT.
    pub session_expiry_interval: Option<u32>,
    /// 0x12: CONNACK, for a client that sent an empty client id.
    pub assigned_client_identifier: Option<String>,
    /// 0x13: seconds; the keepalive the server imposes. CONNACK.
    pub server_keep_alive: Option<u16>,
    /// 0x15: enhanced authentication. CONNECT, CONNACK, AUTH.
    pub authentication_method: Option<String>,
    /// 0x16: CONNECT, CONNACK, AUTH.
    pub authentication_data: Option<Bytes>,
    /// 0x17: 0 or 1. CONNECT.
    pub request_problem_information: Option<u8>,
    /// 0x18: seconds. Will.
    pub will_delay_interval: Option<u32>,
    /// 0x19: 0 or 1. CONNECT.
    pub request_response_information: Option<u8>,
    /// 0x1A: CONNACK.
    pub response_information: Option<String>,
    /// 0x1C: CONNACK, DISCONNECT.
    pub server_reference: Option<String>,
    /// 0x1F: human-readable diagnostics. Every ack, CONNACK, DISCONNECT, AUTH.
    pub reason_string: Option<String>,
    /// 0x21: 1..=65,535 QoS 1/2 publishes in flight. CONNECT, CONNACK.
    pub receive_maximum: Option<u16>,
    /// 0x22: CONNECT, CONNACK.
    pub topic_alias_maximum: Option<u16>,
    /// 0x23: PUBLISH. 0 is invalid, which the session (not the decoder) answers with 0x94.
    pub topic_alias: Option<u16>,
    /// 0x24: 0 or 1. CONNACK.
    pub maximum_qos: Option<u8>,
    /// 0x25: 0 or 1. CONNACK.
    pub retain_available: Option<u8>,
    /// 0x26: name/value pairs, in order, repeatable. Every packet with properties.
    pub user_properties: Vec<(String, String)>,
    /// 0x27: bytes, at least 1. CONNECT, CONNACK.
    pub maximum_packet_size: Option<u32>,
    /// 0x28: 0 or 1. CONNACK.
    pub wildcard_subscription_available: Option<u8>,
    /// 0x29: 0 or 1. CONNACK.
    pub subscription_identifier_available: Option<u8>,
    /// 0x2A: 0 or 1. CONNACK.
    pub shared_subscription_available: Option<u8>,
}

/// Which list a property belongs to: decides which properties it may carry (§2.2.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PropertyContext {
    Connect,
    Will,
    ConnAck,
    Publish,
    /// PUBACK, PUBREC, PUBREL, PUBCOMP.
    Ack,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth,
}

impl PropertyContext {
    fn name(self) -> &'static str {
        match self {
            PropertyContext::Connect => "CONNECT",
            PropertyContext::Will => "will",
            PropertyContext::ConnAck => "CONNACK",
            PropertyContext::Publish => "PUBLISH",
            PropertyContext::Ack => "PUBACK/PUBREC/PUBREL/PUBCOMP",
            PropertyContext::Subscribe => "SUBSCRIBE",
            PropertyContext::SubAck => "SUBACK",
            PropertyContext::Unsubscribe => "UNSUBSCRIBE",
            PropertyContext::UnsubAck => "UNSUBACK",
            PropertyContext::Disconnect => "DISCONNECT",
            PropertyContext::Auth => "AUTH",
        }
    }

    /// Whether a list of this kind may carry property `property` (a defined identifier).
    pub(crate) fn allows(self, property: u8) -> bool {
        use id::*;
        use PropertyContext as C;
        match property {
            USER_PROPERTY => true,
            PAYLOAD_FORMAT_INDICATOR
            | MESSAGE_EXPIRY_INTERVAL
            | CONTENT_TYPE
            | RESPONSE_TOPIC
            | CORRELATION_DATA => matches!(self, C::Publish | C::Will),
            SUBSCRIPTION_IDENTIFIER => matches!(self, C::Publish | C::Subscribe),
            SESSION_EXPIRY_INTERVAL => matches!(self, C::Connect | C::ConnAck | C::Disconnect),
            AUTHENTICATION_METHOD | AUTHENTICATION_DATA => matches!(self, C::Connect | C::ConnAck | C::Auth),
            REQUEST_PROBLEM_INFORMATION | REQUEST_RESPONSE_INFORMATION => self == C::Connect,
            WILL_DELAY_INTERVAL => self == C::Will,
            RECEIVE_MAXIMUM | TOPIC_ALIAS_MAXIMUM | MAXIMUM_PACKET_SIZE => {
                matches!(self, C::Connect | C::ConnAck)
            }
            ASSIGNED_CLIENT_IDENTIFIER
            | SERVER_KEEP_ALIVE
            | RESPONSE_INFORMATION
            | MAXIMUM_QOS
            | RETAIN_AVAILABLE
            | WILDCARD_SUBSCRIPTION_AVAILABLE
            | SUBSCRIPTION_IDENTIFIER_AVAILABLE
            | SHARED_SUBSCRIPTION_AVAILABLE => self == C::ConnAck,
            SERVER_REFERENCE => matches!(self, C::ConnAck | C::Disconnect),
            REASON_STRING => {
                !matches!(self, C::Connect | C::Will | C::Publish | C::Subscribe | C::Unsubscribe)
            }
            TOPIC_ALIAS => self == C::Publish,
            _ => false,
        }
    }
}

/// A byte property that only allows 0 and 1.
fn read_flag(body: &mut Bytes, property: u8) -> Result<u8, DecodeError> {
    match read_u8(body)? {
        value @ (0 | 1) => Ok(value),
        value => Err(DecodeError::InvalidPropertyValue { property, value: value.into() }),
    }
}

/// A u16/u32 property for which 0 is a protocol error.
fn non_zero(property: u8, value: u32) -> Result<u32, DecodeError> {
    if value == 0 {
        Err(DecodeError::InvalidPropertyValue { property, value })
    } else {
        Ok(value)
    }
}

fn set<T>(slot: &mut Option<T>, value: T) {
    *slot = Some(value);
}

impl Properties {
    /// Whether no property is set.
    pub fn is_empty(&self) -> bool {
        // Field by field (not `== Properties::default()`, which builds and compares a
        // 344-byte value: ~90 ns, called up to three times per MQTT 5 ack). Destructured, so a
        // new property cannot be forgotten here.
        let Properties {
            payload_format_indicator,
            message_expiry_interval,
            content_type,
            response_topic,
            correlation_data,
            subscription_identifiers,
            session_expiry_interval,
            assigned_client_identifier,
            server_keep_alive,
            authentication_method,
            authentication_data,
            request_problem_information,
            will_delay_interval,
            request_response_information,
            response_information,
            server_reference,
            reason_string,
            receive_maximum,
            topic_alias_maximum,
            topic_alias,
            maximum_qos,
            retain_available,
            user_properties,
            maximum_packet_size,
            wildcard_subscription_available,
            subscription_identifier_available,
            shared_subscription_available,
        } = self;
        payload_format_indicator.is_none()
            && message_expiry_interval.is_none()
            && content_type.is_none()
            && response_topic.is_none()
            && correlation_data.is_none()
            && subscription_identifiers.is_empty()
            && session_expiry_interval.is_none()
            && assigned_client_identifier.is_none()
            && server_keep_alive.is_none()
            && authentication_method.is_none()
            && authentication_data.is_none()
            && request_problem_information.is_none()
            && will_delay_interval.is_none()
            && request_response_information.is_none()
            && response_information.is_none()
            && server_reference.is_none()
            && reason_string.is_none()
            && receive_maximum.is_none()
            && topic_alias_maximum.is_none()
            && topic_alias.is_none()
            && maximum_qos.is_none()
            && retain_available.is_none()
            && user_properties.is_empty()
            && maximum_packet_size.is_none()
            && wildcard_subscription_available.is_none()
            && subscription_identifier_available.is_none()
            && shared_subscription_available.is_none()
    }

    /// Decodes a property list (length, then properties) from the front of `buf`. At most
    /// `max_user_properties` User Properties are accepted: more fails with
    /// `TooManyUserProperties` before they are allocated.
    pub(crate) fn decode(
        buf: &mut Bytes,
        context: PropertyContext,
        max_user_properties: usize,
    ) -> Result<Properties, DecodeError> {
        let len = read_variable_int(buf)?;
        if buf.len() < len {
            return Err(DecodeError::Truncated);
        }
        let mut body = buf.split_to(len);
        let mut props = Properties::default();
        // One bit per identifier seen (identifiers are below 64).
        let mut seen: u64 = 0;
        while body.has_remaining() {
            // The identifier is a variable byte integer; every defined one fits in one byte.
            let wire_id = read_variable_int(&mut body)?;
            let property = u8::try_from(wire_id).map_err(|_| DecodeError::UnknownProperty(wire_id as u32))?;
            let repeatable = property == id::USER_PROPERTY
                || (property == id::SUBSCRIPTION_IDENTIFIER && context == PropertyContext::Publish);
            if property < 64 && !repeatable {
                if seen & (1 << property) != 0 {
                    return Err(DecodeError::DuplicateProperty(property));
                }
                seen |= 1 << property;
            }
            props.read_value(&mut body, property, context, max_user_properties)?;
        }
        Ok(props)
    }

    fn read_value(
        &mut self,
        body: &mut Bytes,
        property: u8,
        context: PropertyContext,
        max_user_properties: usize,
    ) -> Result<(), DecodeError> {
        use id::*;
        let known = matches!(property, 0x01..=0x03 | 0x08 | 0x09 | 0x0B | 0x11..=0x13 | 0x15..=0x1A | 0x1C | 0x1F | 0x21..=0x2A);
        if !known {
            return Err(DecodeError::UnknownProperty(property.into()));
        }
        if !context.allows(property) {
            return Err(DecodeError::PropertyNotAllowed { property, packet: context.name() });
        }
        match property {
            PAYLOAD_FORMAT_INDICATOR => set(&mut self.payload_format_indicator, read_flag(body, property)?),
            MESSAGE_EXPIRY_INTERVAL => set(&mut self.message_expiry_interval, read_u32(body)?),
            CONTENT_TYPE => set(&mut self.content_type, read_string(body)?),
            RESPONSE_TOPIC => set(&mut self.response_topic, read_string(body)?),
            CORRELATION_DATA => set(&mut self.correlation_data, read_bytes(body)?),
            SUBSCRIPTION_IDENTIFIER => {
                let value = read_variable_int(body)? as u32;
                self.subscription_identifiers.push(non_zero(property, value)?);
            }
            SESSION_EXPIRY_INTERVAL => set(&mut self.session_expiry_interval, read_u32(body)?),
            ASSIGNED_CLIENT_IDENTIFIER => set(&mut self.assigned_client_identifier, read_string(body)?),
            SERVER_KEEP_ALIVE => set(&mut self.server_keep_alive, read_u16(body)?),
            AUTHENTICATION_METHOD => set(&mut self.authentication_method, read_string(body)?),
            AUTHENTICATION_DATA => set(&mut self.authentication_data, read_bytes(body)?),
            REQUEST_PROBLEM_INFORMATION => {
                set(&mut self.request_problem_information, read_flag(body, property)?)
            }
            WILL_DELAY_INTERVAL => set(&mut self.will_delay_interval, read_u32(body)?),
            REQUEST_RESPONSE_INFORMATION => {
                set(&mut self.request_response_information, read_flag(body, property)?)
            }
            RESPONSE_INFORMATION => set(&mut self.response_information, read_string(body)?),
            SERVER_REFERENCE => set(&mut self.server_reference, read_string(body)?),
            REASON_STRING => set(&mut self.reason_string, read_string(body)?),
            RECEIVE_MAXIMUM => {
                let value = non_zero(property, read_u16(body)?.into())?;
                set(&mut self.receive_maximum, value as u16);
            }
            TOPIC_ALIAS_MAXIMUM => set(&mut self.topic_alias_maximum, read_u16(body)?),
            TOPIC_ALIAS => set(&mut self.topic_alias, read_u16(body)?),
            MAXIMUM_QOS => set(&mut self.maximum_qos, read_flag(body, property)?),
            RETAIN_AVAILABLE => set(&mut self.retain_available, read_flag(body, property)?),
            USER_PROPERTY => {
                if self.user_properties.len() >= max_user_properties {
                    return Err(DecodeError::TooManyUserProperties { max: max_user_properties });
                }
                let name = read_string(body)?;
                let value = read_string(body)?;
                self.user_properties.push((name, value));
            }
            MAXIMUM_PACKET_SIZE => set(&mut self.maximum_packet_size, non_zero(property, read_u32(body)?)?),
            WILDCARD_SUBSCRIPTION_AVAILABLE => {
                set(&mut self.wildcard_subscription_available, read_flag(body, property)?)
            }
            SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
                set(&mut self.subscription_identifier_available, read_flag(body, property)?)
            }
            SHARED_SUBSCRIPTION_AVAILABLE => {
                set(&mut self.shared_subscription_available, read_flag(body, property)?)
            }
            _ => return Err(DecodeError::UnknownProperty(property.into())),
        }
        Ok(())
    }

    /// Bytes of the properties themselves, without the length prefix.
    fn content_len(&self) -> usize {
        let byte = |v: &Option<u8>| v.map_or(0, |_| 2);
        let short = |v: &Option<u16>| v.map_or(0, |_| 3);
        let long = |v: &Option<u32>| v.map_or(0, |_| 5);
        let text = |v: &Option<String>| v.as_deref().map_or(0, |s| 1 + string_field_len(s));
        let binary = |v: &Option<Bytes>| v.as_deref().map_or(0, |b| 1 + bytes_field_len(b));
        byte(&self.payload_format_indicator)
            + long(&self.message_expiry_interval)
            + text(&self.content_type)
            + text(&self.response_topic)
            + binary(&self.correlation_data)
            + self.subscription_identifiers.iter().map(|&v| 1 + variable_int_len(v as usize)).sum::<usize>()
            + long(&self.session_expiry_interval)
            + text(&self.assigned_client_identifier)
            + short(&self.server_keep_alive)
            + text(&self.authentication_method)
            + binary(&self.authentication_data)
            + byte(&self.request_problem_information)
            + long(&self.will_delay_interval)
            + byte(&self.request_response_information)
            + text(&self.response_information)
            + text(&self.server_reference)
            + text(&self.reason_string)
            + short(&self.receive_maximum)
            + short(&self.topic_alias_maximum)
            + short(&self.topic_alias)
            + byte(&self.maximum_qos)
            + byte(&self.retain_available)
            + self
                .user_properties
                .iter()
                .map(|(name, value)| 1 + string_field_len(name) + string_field_len(value))
                .sum::<usize>()
            + long(&self.maximum_packet_size)
            + byte(&self.wildcard_subscription_available)
            + byte(&self.subscription_identifier_available)
            + byte(&self.shared_subscription_available)
    }

    /// Encoded size: the length prefix and the properties.
    pub(crate) fn encoded_len(&self) -> usize {
        let len = self.content_len();
        variable_int_len(len) + len
    }

    /// Writes the length prefix and every property set, in identifier order.
    pub(crate) fn encode(&self, out: &mut BytesMut) {
        use id::*;
        write_variable_int(out, self.content_len());
        let byte = |out: &mut BytesMut, property: u8, v: Option<u8>| {
            if let Some(v) = v {
                out.put_u8(property);
                out.put_u8(v);
            }
        };
        let short = |out: &mut BytesMut, property: u8, v: Option<u16>| {
            if let Some(v) = v {
                out.put_u8(property);
                out.put_u16(v);
            }
        };
        let long = |out: &mut BytesMut, property: u8, v: Option<u32>| {
            if let Some(v) = v {
                out.put_u8(property);
                out.put_u32(v);
            }
        };
        let text = |out: &mut BytesMut, property: u8, v: &Option<String>| {
            if let Some(v) = v {
                out.put_u8(property);
                write_string(out, v);
            }
        };
        let binary = |out: &mut BytesMut, property: u8, v: &Option<Bytes>| {
            if let Some(v) = v {
                out.put_u8(property);
                write_bytes(out, v);
            }
        };
        byte(out, PAYLOAD_FORMAT_INDICATOR, self.payload_format_indicator);
        long(out, MESSAGE_EXPIRY_INTERVAL, self.message_expiry_interval);
        text(out, CONTENT_TYPE, &self.content_type);
        text(out, RESPONSE_TOPIC, &self.response_topic);
        binary(out, CORRELATION_DATA, &self.correlation_data);
        for &value in &self.subscription_identifiers {
            out.put_u8(SUBSCRIPTION_IDENTIFIER);
            write_variable_int(out, (value as usize).min(MAX_REMAINING_LENGTH));
        }
        long(out, SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        text(out, ASSIGNED_CLIENT_IDENTIFIER, &self.assigned_client_identifier);
        short(out, SERVER_KEEP_ALIVE, self.server_keep_alive);
        text(out, AUTHENTICATION_METHOD, &self.authentication_method);
        binary(out, AUTHENTICATION_DATA, &self.authentication_data);
        byte(out, REQUEST_PROBLEM_INFORMATION, self.request_problem_information);
        long(out, WILL_DELAY_INTERVAL, self.will_delay_interval);
        byte(out, REQUEST_RESPONSE_INFORMATION, self.request_response_information);
        text(out, RESPONSE_INFORMATION, &self.response_information);
        text(out, SERVER_REFERENCE, &self.server_reference);
        text(out, REASON_STRING, &self.reason_string);
        short(out, RECEIVE_MAXIMUM, self.receive_maximum);
        short(out, TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        short(out, TOPIC_ALIAS, self.topic_alias);
        byte(out, MAXIMUM_QOS, self.maximum_qos);
        byte(out, RETAIN_AVAILABLE, self.retain_available);
        for (name, value) in &self.user_properties {
            out.put_u8(USER_PROPERTY);
            write_string(out, name);
            write_string(out, value);
        }
        long(out, MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        byte(out, WILDCARD_SUBSCRIPTION_AVAILABLE, self.wildcard_subscription_available);
        byte(out, SUBSCRIPTION_IDENTIFIER_AVAILABLE, self.subscription_identifier_available);
        byte(out, SHARED_SUBSCRIPTION_AVAILABLE, self.shared_subscription_available);
    }

    /// Removes the Reason String and User Properties, the properties a sender drops first when
    /// a packet would exceed the receiver's Maximum Packet Size (§3.1.2.11.4). Returns whether
    /// anything was removed.
    pub fn strip_diagnostics(&mut self) -> bool {
        let had = self.reason_string.is_some() || !self.user_properties.is_empty();
        self.reason_string = None;
        self.user_properties = Vec::new();
        had
    }
}

#[cfg(test)]
mod tests {
    /// Any one property set, even to its zero value, makes the list non-empty.
    #[test]
    fn is_empty_sees_every_property() {
        assert!(Properties::default().is_empty());
        let each = [
            Properties { payload_format_indicator: Some(0), ..Properties::default() },
            Properties { message_expiry_interval: Some(0), ..Properties::default() },
            Properties { content_type: Some(String::new()), ..Properties::default() },
            Properties { response_topic: Some(String::new()), ..Properties::default() },
            Properties { correlation_data: Some(Bytes::new()), ..Properties::default() },
            Properties { subscription_identifiers: vec![1], ..Properties::default() },
            Properties { session_expiry_interval: Some(0), ..Properties::default() },
            Properties { assigned_client_identifier: Some(String::new()), ..Properties::default() },
            Properties { server_keep_alive: Some(0), ..Properties::default() },
            Properties { authentication_method: Some(String::new()), ..Properties::default() },
            Properties { authentication_data: Some(Bytes::new()), ..Properties::default() },
            Properties { request_problem_information: Some(0), ..Properties::default() },
            Properties { will_delay_interval: Some(0), ..Properties::default() },
            Properties { request_response_information: Some(0), ..Properties::default() },
            Properties { response_information: Some(String::new()), ..Properties::default() },
            Properties { server_reference: Some(String::new()), ..Properties::default() },
            Properties { reason_string: Some(String::new()), ..Properties::default() },
            Properties { receive_maximum: Some(0), ..Properties::default() },
            Properties { topic_alias_maximum: Some(0), ..Properties::default() },
            Properties { topic_alias: Some(0), ..Properties::default() },
            Properties { maximum_qos: Some(0), ..Properties::default() },
            Properties { retain_available: Some(0), ..Properties::default() },
            Properties { user_properties: vec![(String::new(), String::new())], ..Properties::default() },
            Properties { maximum_packet_size: Some(0), ..Properties::default() },
            Properties { wildcard_subscription_available: Some(0), ..Properties::default() },
            Properties { subscription_identifier_available: Some(0), ..Properties::default() },
            Properties { shared_subscription_available: Some(0), ..Properties::default() },
        ];
        for (i, properties) in each.iter().enumerate() {
            assert!(!properties.is_empty(), "property {i}");
        }
    }

    use super::*;

    fn decode(bytes: &[u8], context: PropertyContext) -> Result<Properties, DecodeError> {
        let mut buf = Bytes::copy_from_slice(bytes);
        let props = Properties::decode(&mut buf, context, 4)?;
        assert!(buf.is_empty() || buf[..] == [0xAA], "only the trailing marker is left");
        Ok(props)
    }

    fn encoded(props: &Properties) -> Vec<u8> {
        let mut out = BytesMut::new();
        props.encode(&mut out);
        assert_eq!(out.len(), props.encoded_len());
        out.to_vec()
    }

    #[test]
    fn publish_properties_fixture() {
        let bytes = [
            0x1B, // property length 27
            0x01, 0x01, // payload format indicator: UTF-8
            0x02, 0x00, 0x00, 0x00, 0x3C, // message expiry interval 60 s
            0x03, 0x00, 0x04, b'j', b's', b'o', b'n', // content type "json"
            0x0B, 0x80, 0x01, // subscription identifier 128 (two-byte variable integer)
            0x23, 0x00, 0x05, // topic alias 5
            0x26, 0x00, 0x01, b'k', 0x00, 0x01, b'v', // user property ("k", "v")
            0xAA, // trailing marker: the next field of the packet, not a property
        ];
        let expected = Properties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(60),
            content_type: Some("json".into()),
            subscription_identifiers: vec![128],
            topic_alias: Some(5),
            user_properties: vec![("k".into(), "v".into())],
            ..Properties::default()
        };
        assert_eq!(decode(&bytes, PropertyContext::Publish), Ok(expected.clone()));
        assert_eq!(encoded(&expected), &bytes[..bytes.len() - 1]);
    }

    #[test]
    fn empty_list_is_one_zero_byte() {
        assert_eq!(decode(&[0x00], PropertyContext::Ack), Ok(Properties::default()));
        assert_eq!(encoded(&Properties::default()), [0x00]);
    }

    #[test]
    fn duplicates_are_protocol_errors_except_user_properties() {
        let twice = [
            0x06, // property length 6
            0x23, 0x00, 0x01, // topic alias 1
            0x23, 0x00, 0x02, // topic alias 2
        ];
        assert_eq!(decode(&twice, PropertyContext::Publish), Err(DecodeError::DuplicateProperty(0x23)));
        let users = [
            0x0D, // property length 13
            0x26, 0x00, 0x01, b'a', 0x00, 0x00, // ("a", "")
            0x26, 0x00, 0x01, b'a', 0x00, 0x01, b'b', // ("a", "b"): same name again is fine
        ];
        let props = decode(&users, PropertyContext::Ack).unwrap();
        assert_eq!(props.user_properties, [("a".into(), String::new()), ("a".into(), "b".into())]);
        let sub_ids = [
            0x04, // property length 4
            0x0B, 0x01, // subscription identifier 1
            0x0B, 0x02, // subscription identifier 2: repeatable in PUBLISH only
        ];
        assert_eq!(decode(&sub_ids, PropertyContext::Publish).unwrap().subscription_identifiers, [1, 2]);
        assert_eq!(decode(&sub_ids, PropertyContext::Subscribe), Err(DecodeError::DuplicateProperty(0x0B)));
    }

    #[test]
    fn unknown_and_misplaced_identifiers() {
        let unknown = [
            0x02, // property length 2
            0x04, 0x00, // 0x04 is not a property
        ];
        assert_eq!(decode(&unknown, PropertyContext::Publish), Err(DecodeError::UnknownProperty(4)));
        let big_id = [
            0x03, // property length 3
            0x80, 0x01, 0x00, // identifier 128 as a two-byte variable integer
        ];
        assert_eq!(decode(&big_id, PropertyContext::Publish), Err(DecodeError::UnknownProperty(128)));
        let misplaced = [
            0x03, // property length 3
            0x21, 0x00, 0x0A, // receive maximum 10: a CONNECT/CONNACK property
        ];
        assert_eq!(
            decode(&misplaced, PropertyContext::Publish),
            Err(DecodeError::PropertyNotAllowed { property: 0x21, packet: "PUBLISH" })
        );
        let reason_in_publish = [
            0x04, // property length 4
            0x1F, 0x00, 0x01, b'x', // reason string "x"
        ];
        assert!(matches!(
            decode(&reason_in_publish, PropertyContext::Publish),
            Err(DecodeError::PropertyNotAllowed { property: 0x1F, .. })
        ));
    }

    #[test]
    fn invalid_values() {
        let cases: [(&[u8], PropertyContext, DecodeError); 5] = [
            (
                &[0x02, 0x01, 0x02], // payload format indicator 2
                PropertyContext::Publish,
                DecodeError::InvalidPropertyValue { property: 0x01, value: 2 },
            ),
            (
                &[0x03, 0x21, 0x00, 0x00], // receive maximum 0
                PropertyContext::Connect,
                DecodeError::InvalidPropertyValue { property: 0x21, value: 0 },
            ),
            (
                &[0x05, 0x27, 0x00, 0x00, 0x00, 0x00], // maximum packet size 0
                PropertyContext::Connect,
                DecodeError::InvalidPropertyValue { property: 0x27, value: 0 },
            ),
            (
                &[0x02, 0x0B, 0x00], // subscription identifier 0
                PropertyContext::Subscribe,
                DecodeError::InvalidPropertyValue { property: 0x0B, value: 0 },
            ),
            (
                &[0x02, 0x17, 0x05], // request problem information 5
                PropertyContext::Connect,
                DecodeError::InvalidPropertyValue { property: 0x17, value: 5 },
            ),
        ];
        for (bytes, context, error) in cases {
            assert_eq!(decode(bytes, context), Err(error), "{bytes:02x?}");
        }
    }

    #[test]
    fn length_and_values_must_fit() {
        assert_eq!(
            decode(&[0x05, 0x01], PropertyContext::Publish), // claims 5 bytes, has 1
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            decode(&[0x02, 0x02, 0x00], PropertyContext::Publish), // expiry needs 4 bytes, has 1
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            decode(&[0x80, 0x80, 0x80, 0x80, 0x01], PropertyContext::Publish), // 5-byte length
            Err(DecodeError::MalformedVariableInteger)
        );
    }

    #[test]
    fn user_property_cap_is_checked_before_allocating() {
        let mut bytes = vec![5 * 6]; // property length: 6 empty user properties
        for _ in 0..6 {
            bytes.extend_from_slice(&[0x26, 0x00, 0x00, 0x00, 0x00]); // ("", "")
        }
        assert_eq!(
            decode(&bytes, PropertyContext::Publish),
            Err(DecodeError::TooManyUserProperties { max: 4 })
        );
    }

    #[test]
    fn strip_diagnostics_keeps_the_rest() {
        let mut props = Properties {
            reason_string: Some("why".into()),
            user_properties: vec![("a".into(), "b".into())],
            session_expiry_interval: Some(0),
            ..Properties::default()
        };
        assert!(props.strip_diagnostics());
        assert_eq!(props, Properties { session_expiry_interval: Some(0), ..Properties::default() });
        assert!(!props.strip_diagnostics());
    }
}
