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
