//! MQTT 5 reason codes (§2.4): the one-byte outcome carried by CONNACK, the acks, SUBACK,
//! UNSUBACK, DISCONNECT and AUTH. Below 0x80 is success, 0x80 and above is failure.

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::DecodeError;
use super::header::{expect_end, read_u8};
use super::properties::{Properties, PropertyContext};

/// An MQTT 5 reason code. Several codes share a value (0x00 is Success, Normal disconnection
/// and Granted QoS 0); the variant is named after its most common meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum ReasonCode {
    /// Success; Normal disconnection; Granted QoS 0.
    Success = 0x00,
    GrantedQoS1 = 0x01,
    GrantedQoS2 = 0x02,
    DisconnectWithWillMessage = 0x04,
    NoMatchingSubscribers = 0x10,
    NoSubscriptionExisted = 0x11,
    ContinueAuthentication = 0x18,
    ReAuthenticate = 0x19,
    UnspecifiedError = 0x80,
    MalformedPacket = 0x81,
    ProtocolError = 0x82,
    ImplementationSpecificError = 0x83,
    UnsupportedProtocolVersion = 0x84,
    ClientIdentifierNotValid = 0x85,
    BadUserNameOrPassword = 0x86,
    NotAuthorized = 0x87,
    ServerUnavailable = 0x88,
    ServerBusy = 0x89,
    Banned = 0x8A,
    ServerShuttingDown = 0x8B,
    BadAuthenticationMethod = 0x8C,
    KeepAliveTimeout = 0x8D,
    SessionTakenOver = 0x8E,
    TopicFilterInvalid = 0x8F,
    TopicNameInvalid = 0x90,
    PacketIdentifierInUse = 0x91,
    PacketIdentifierNotFound = 0x92,
    ReceiveMaximumExceeded = 0x93,
    TopicAliasInvalid = 0x94,
    PacketTooLarge = 0x95,
    MessageRateTooHigh = 0x96,
    QuotaExceeded = 0x97,
    AdministrativeAction = 0x98,
    PayloadFormatInvalid = 0x99,
    RetainNotSupported = 0x9A,
    QoSNotSupported = 0x9B,
    UseAnotherServer = 0x9C,
    ServerMoved = 0x9D,
    SharedSubscriptionsNotSupported = 0x9E,
    ConnectionRateExceeded = 0x9F,
    MaximumConnectTime = 0xA0,
    SubscriptionIdentifiersNotSupported = 0xA1,
    WildcardSubscriptionsNotSupported = 0xA2,
}

/// Every reason code, in value order (for tests and `from_u8`).
const ALL: [ReasonCode; 43] = {
    use ReasonCode::*;
    [
        Success,
        GrantedQoS1,
        GrantedQoS2,
        DisconnectWithWillMessage,
        NoMatchingSubscribers,
        NoSubscriptionExisted,
        ContinueAuthentication,
        ReAuthenticate,
        UnspecifiedError,
        MalformedPacket,
        ProtocolError,
        ImplementationSpecificError,
        UnsupportedProtocolVersion,
        ClientIdentifierNotValid,
        BadUserNameOrPassword,
        NotAuthorized,
        ServerUnavailable,
        ServerBusy,
        Banned,
        ServerShuttingDown,
        BadAuthenticationMethod,
        KeepAliveTimeout,
        SessionTakenOver,
        TopicFilterInvalid,
        TopicNameInvalid,
        PacketIdentifierInUse,
        PacketIdentifierNotFound,
        ReceiveMaximumExceeded,
        TopicAliasInvalid,
        PacketTooLarge,
        MessageRateTooHigh,
        QuotaExceeded,
        AdministrativeAction,
        PayloadFormatInvalid,
        RetainNotSupported,
        QoSNotSupported,
        UseAnotherServer,
        ServerMoved,
        SharedSubscriptionsNotSupported,
        ConnectionRateExceeded,
        MaximumConnectTime,
        SubscriptionIdentifiersNotSupported,
        WildcardSubscriptionsNotSupported,
    ]
};

impl ReasonCode {
    /// Maps a wire value to a reason code; `None` for values MQTT 5 does not define.
    pub fn from_u8(value: u8) -> Option<ReasonCode> {
        ALL.binary_search_by_key(&value, |code| *code as u8).ok().map(|index| ALL[index])
    }

    /// Reads a reason code byte, rejecting undefined values as malformed.
    pub(crate) fn decode(value: u8) -> Result<ReasonCode, DecodeError> {
        ReasonCode::from_u8(value).ok_or(DecodeError::InvalidReasonCode(value))
    }

    /// Every defined reason code.
    pub fn all() -> &'static [ReasonCode] {
        &ALL
    }

    /// Whether the code reports a failure (0x80 and above).
    pub fn is_error(self) -> bool {
        self as u8 >= 0x80
    }
}

/// Reads the optional "reason code, then properties" end of an MQTT 5 ack, DISCONNECT or
/// AUTH: nothing left means Success without properties, one byte means no properties.
pub(crate) fn decode_reason_tail(
    mut body: Bytes,
    context: PropertyContext,
    max_user_properties: usize,
) -> Result<(ReasonCode, Properties), DecodeError> {
    if body.is_empty() {
        return Ok((ReasonCode::Success, Properties::default()));
    }
    let reason = ReasonCode::decode(read_u8(&mut body)?)?;
    if body.is_empty() {
        return Ok((reason, Properties::default()));
    }
    let properties = Properties::decode(&mut body, context, max_user_properties)?;
    expect_end(&body)?;
    Ok((reason, properties))
}

/// Size of the shortest form of a reason tail: nothing for Success without properties, the
/// reason code alone without properties, else both.
pub(crate) fn reason_tail_len(reason: ReasonCode, properties: &Properties) -> usize {
    if !properties.is_empty() {
        1 + properties.encoded_len()
    } else if reason != ReasonCode::Success {
        1
    } else {
        0
    }
}

/// Writes the shortest form of a reason tail (see [`reason_tail_len`]).
pub(crate) fn encode_reason_tail(reason: ReasonCode, properties: &Properties, out: &mut BytesMut) {
    if !properties.is_empty() {
        out.put_u8(reason as u8);
        properties.encode(out);
    } else if reason != ReasonCode::Success {
        out.put_u8(reason as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_maps_back() {
        for window in ALL.windows(2) {
            assert!((window[0] as u8) < (window[1] as u8), "ALL is sorted: {window:?}");
        }
        for value in 0..=u8::MAX {
            match ReasonCode::from_u8(value) {
                Some(code) => assert_eq!(code as u8, value),
                None => assert!(!ALL.iter().any(|c| *c as u8 == value)),
            }
        }
        assert_eq!(ReasonCode::from_u8(0x99), Some(ReasonCode::PayloadFormatInvalid));
        assert_eq!(ReasonCode::from_u8(0x03), None);
        assert_eq!(ReasonCode::from_u8(0xA3), None);
        assert!(ReasonCode::ServerBusy.is_error());
        assert!(!ReasonCode::NoSubscriptionExisted.is_error());
    }
}
