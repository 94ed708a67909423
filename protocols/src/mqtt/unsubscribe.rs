//! UNSUBSCRIBE: topic filters to remove (its answer UNSUBACK is a packet-id-only ack).

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::DecodeError;
use super::header::{read_packet_id, read_string, string_field_len, write_string};
use super::subscribe::validate_topic_filter;

/// Client → server: remove one or more subscriptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Non-zero packet id, echoed by the UNSUBACK.
    pub pkid: u16,
    /// At least one topic filter, as given in the SUBSCRIBE.
    pub filters: Vec<String>,
}

impl Unsubscribe {
    pub(crate) fn decode(mut body: Bytes) -> Result<Self, DecodeError> {
        let pkid = read_packet_id(&mut body)?;
        let mut filters = Vec::new();
        while !body.is_empty() {
            let filter = read_string(&mut body)?;
            validate_topic_filter(&filter)?;
            filters.push(filter);
        }
        if filters.is_empty() {
            return Err(DecodeError::EmptySubscription);
        }
        Ok(Unsubscribe { pkid, filters })
    }

    pub(crate) fn body_len(&self) -> usize {
        2 + self.filters.iter().map(|filter| string_field_len(filter)).sum::<usize>()
    }

    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        out.put_u16(self.pkid);
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
}
