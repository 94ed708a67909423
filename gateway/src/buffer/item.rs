//! What a disk-buffer entry holds: one fabric item (a record or a dead letter) as a protobuf
//! `weir.v1.BufferedItem`, so a replay after a restart gives back exactly what was appended.

use bytes::Bytes;
use prost::Message as _;
use weir_proto::v1::{buffered_item, BufferedItem, DeadLetter as ProtoDeadLetter};
use weir_proto::SourceProtocol;

use crate::fabric::{DeadLetter, Payload};

/// A log entry that is not a `BufferedItem` (a newer format, or damage the checksum missed).
#[derive(Debug, thiserror::Error)]
pub enum ItemError {
    #[error("buffer entry is not a weir.v1.BufferedItem: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("buffer entry holds neither a record nor a dead letter")]
    Empty,
}

/// Appends `payload` as a `BufferedItem` to `out`, without copying the record.
pub fn encode_item(payload: &Payload, out: &mut Vec<u8>) {
    match payload {
        // Field 1 of the envelope, written straight from the borrowed record.
        Payload::Record(record) => prost::encoding::message::encode(1, record, out),
        Payload::DeadLetter(letter) => {
            let letter = ProtoDeadLetter {
                device_id: letter.device_id.clone(),
                protocol: letter.protocol as i32,
                source: letter.source.clone(),
                error: letter.error.clone(),
                raw: letter.raw.to_vec(),
                received_ts_ms: letter.received_ts_ms,
            };
            prost::encoding::message::encode(2, &letter, out);
        }
    }
}

/// The item an entry holds.
pub fn decode_item(entry: &[u8]) -> Result<Payload, ItemError> {
    match BufferedItem::decode(entry)?.item {
        Some(buffered_item::Item::Record(record)) => Ok(Payload::Record(record)),
        Some(buffered_item::Item::DeadLetter(letter)) => Ok(Payload::DeadLetter(DeadLetter {
            device_id: letter.device_id,
            protocol: SourceProtocol::try_from(letter.protocol).unwrap_or(SourceProtocol::Unspecified),
            source: letter.source,
            error: letter.error,
            raw: Bytes::from(letter.raw),
            received_ts_ms: letter.received_ts_ms,
        })),
        None => Err(ItemError::Empty),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_proto::{metric_value::Kind, MetricValue, Record};

    #[test]
    fn records_and_dead_letters_round_trip() {
        let record = Record {
            device_id: "sensor-1".into(),
            seq: Some(42),
            device_ts_ms: Some(1_764_158_400_000),
            received_ts_ms: 1_764_158_400_123,
            protocol: SourceProtocol::Tcp as i32,
            source: "tcp://127.0.0.1:7000".into(),
            metrics: [("temp".to_owned(), MetricValue { kind: Some(Kind::Number(21.5)) })].into(),
            tags: [("site".to_owned(), "north".to_owned())].into(),
            raw: b"{}".to_vec(),
        };
        let mut out = Vec::new();
        encode_item(&Payload::Record(record.clone()), &mut out);
        // The envelope is exactly a BufferedItem with the record in field 1.
        let expected =
            BufferedItem { item: Some(buffered_item::Item::Record(record.clone())) }.encode_to_vec();
        assert_eq!(out, expected);
        match decode_item(&out).unwrap() {
            Payload::Record(back) => assert_eq!(back, record),
            other => panic!("expected a record, got {other:?}"),
        }

        let letter = DeadLetter {
            device_id: "bad-dev".into(),
            protocol: SourceProtocol::Websocket,
            source: "/ingest".into(),
            error: "invalid JSON".into(),
            raw: Bytes::from_static(b"temperature=21"),
            received_ts_ms: 7,
        };
        let mut out = Vec::new();
        encode_item(&Payload::DeadLetter(letter.clone()), &mut out);
        match decode_item(&out).unwrap() {
            Payload::DeadLetter(back) => {
                assert_eq!(
                    (back.device_id, back.protocol, back.source, back.error, back.raw, back.received_ts_ms),
                    (letter.device_id, letter.protocol, letter.source, letter.error, letter.raw, 7)
                );
            }
            other => panic!("expected a dead letter, got {other:?}"),
        }
    }

    #[test]
    fn entries_that_are_not_items_are_errors() {
        assert!(matches!(decode_item(&[]), Err(ItemError::Empty)));
        assert!(matches!(decode_item(&[0x0a, 0x05, 0x01]), Err(ItemError::Decode(_))));
    }
}
