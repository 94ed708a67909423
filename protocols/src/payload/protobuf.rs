//! Protobuf device payloads: a `weir.v1.DevicePayload` holding one reading or a batch.

use prost::Message;
use weir_proto::{v1::device_payload::Body, DevicePayload, Reading, Record};

use super::{check_reading_count, finish_record, DecodeContext, PayloadError};

pub(super) fn decode(
    payload: &[u8],
    ctx: &DecodeContext<'_>,
    out: &mut Vec<Record>,
) -> Result<(), PayloadError> {
    let message = DevicePayload::decode(payload).map_err(|e| PayloadError::Protobuf(e.to_string()))?;
    match message.body {
        None => Err(PayloadError::EmptyPayload),
        Some(Body::Hello(_)) => Err(PayloadError::UnexpectedHello),
        Some(Body::Reading(reading)) => {
            out.push(finish_record(record(reading), "", payload, ctx)?);
            Ok(())
        }
        Some(Body::Batch(batch)) => {
            check_reading_count(batch.readings.len(), &ctx.limits)?;
            out.reserve(batch.readings.len());
            for reading in batch.readings {
                out.push(finish_record(record(reading), &batch.device_id, payload, ctx)?);
            }
            Ok(())
        }
    }
}

fn record(reading: Reading) -> Record {
    Record {
        device_id: reading.device_id,
        seq: reading.seq,
        device_ts_ms: reading.ts_ms,
        metrics: reading.metrics,
        tags: reading.tags,
        ..Record::default()
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::ctx;
    use super::*;
    use weir_proto::{metric_value::Kind, MetricValue, ReadingBatch};

    fn reading(device_id: &str, seq: u64) -> Reading {
        Reading {
            device_id: device_id.into(),
            seq: Some(seq),
            ts_ms: Some(5),
            metrics: [("t".to_string(), MetricValue { kind: Some(Kind::Number(1.5)) })].into(),
            tags: [("k".to_string(), "v".to_string())].into(),
        }
    }

    #[test]
    fn single_reading() {
        let bytes = DevicePayload { body: Some(Body::Reading(reading("", 9))) }.encode_to_vec();
        let mut out = Vec::new();
        decode(&bytes, &ctx(), &mut out).unwrap();
        assert_eq!(out[0].device_id, "client-7");
        assert_eq!(out[0].seq, Some(9));
        assert_eq!(out[0].device_ts_ms, Some(5));
        assert_eq!(out[0].metrics["t"].kind, Some(Kind::Number(1.5)));
        assert_eq!(out[0].tags["k"], "v");
    }

    #[test]
    fn batch_takes_batch_device_id_when_reading_has_none() {
        let batch = ReadingBatch { device_id: "gw".into(), readings: vec![reading("", 1), reading("d2", 2)] };
        let bytes = DevicePayload { body: Some(Body::Batch(batch)) }.encode_to_vec();
        let mut out = Vec::new();
        decode(&bytes, &ctx(), &mut out).unwrap();
        assert_eq!(out.iter().map(|r| r.device_id.as_str()).collect::<Vec<_>>(), ["gw", "d2"]);
    }

    #[test]
    fn garbage_and_empty_payloads_are_errors() {
        let mut out = Vec::new();
        assert!(matches!(decode(&[0xff, 0xff, 0xff], &ctx(), &mut out), Err(PayloadError::Protobuf(_))));
        assert_eq!(decode(&[], &ctx(), &mut out), Err(PayloadError::EmptyPayload));
    }
}

#[cfg(test)]
mod properties {
    use super::super::tests::ctx;
    use super::*;
    use proptest::prelude::*;
    use weir_proto::{metric_value::Kind, MetricValue, ReadingBatch};

    fn metric() -> impl Strategy<Value = MetricValue> {
        prop_oneof![
            any::<f64>().prop_map(Kind::Number),
            any::<bool>().prop_map(Kind::Flag),
            ".{0,8}".prop_map(Kind::Text),
        ]
        .prop_map(|k| MetricValue { kind: Some(k) })
    }

    fn reading() -> impl Strategy<Value = Reading> {
        (
            "[a-z0-9-]{0,12}",
            proptest::option::of(0..=i64::MAX as u64),
            proptest::option::of(any::<i64>()),
            proptest::collection::btree_map("[a-z.]{1,6}", metric(), 0..5),
            proptest::collection::btree_map("[a-z]{1,6}", ".{0,6}", 0..3),
        )
            .prop_map(|(device_id, seq, ts_ms, metrics, tags)| Reading {
                device_id,
                seq,
                ts_ms,
                metrics,
                tags,
            })
    }

    proptest! {
        /// Every reading a device encodes comes out as a record with the same fields.
        #[test]
        fn encoded_readings_decode_to_the_same_fields(readings in proptest::collection::vec(reading(), 1..6)) {
            let batch = ReadingBatch { device_id: "batch-dev".into(), readings: readings.clone() };
            let bytes = DevicePayload { body: Some(Body::Batch(batch)) }.encode_to_vec();
            let mut out = Vec::new();
            decode(&bytes, &ctx(), &mut out).unwrap();
            prop_assert_eq!(out.len(), readings.len());
            for (record, reading) in out.iter().zip(&readings) {
                let want_id = if reading.device_id.is_empty() { "batch-dev" } else { reading.device_id.as_str() };
                prop_assert_eq!(&record.device_id, want_id);
                prop_assert_eq!(record.seq, reading.seq);
                prop_assert_eq!(record.device_ts_ms, reading.ts_ms);
                prop_assert_eq!(format!("{:?}", record.metrics), format!("{:?}", reading.metrics));
                prop_assert_eq!(&record.tags, &reading.tags);
            }
        }

        /// Arbitrary bytes never panic either decoder; they decode or give an error.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut out = Vec::new();
            let _ = crate::payload::decode(crate::payload::PayloadFormat::Auto, &bytes, &ctx(), &mut out);
            let _ = crate::payload::decode(crate::payload::PayloadFormat::Json, &bytes, &ctx(), &mut out);
            let _ = crate::payload::decode(crate::payload::PayloadFormat::Protobuf, &bytes, &ctx(), &mut out);
        }
    }
}
