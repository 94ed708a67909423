//! Payload decoding (JSON, protobuf) over arbitrary bytes and limits.
//!
//! Input: `[max_readings, max_fields, max_device_id_len, flags, payload...]`; `flags & 1`
//! keeps the raw payload, `flags & 2` gives the connection no device id, `flags & 4` decodes
//! with `auto` instead of the target's format. Checked: a failed decode leaves the output as it
//! was; no record breaks a limit (readings, fields, device id length, seq range) and each
//! carries the context's fields; and the records, written back as a payload of the same
//! format, decode to the same records.

use prost::Message as _;
use serde_json::{Map, Value};
use weir_proto::v1::device_payload::Body;
use weir_proto::{metric_value::Kind, DevicePayload, Reading, ReadingBatch, Record, SourceProtocol};

use super::Input;
use crate::payload::{decode, resolve_format, DecodeContext, PayloadFormat, PayloadLimits};

pub fn payload_json(data: &[u8]) {
    decode_payload(PayloadFormat::Json, data);
}

pub fn payload_protobuf(data: &[u8]) {
    decode_payload(PayloadFormat::Protobuf, data);
}

fn decode_payload(format: PayloadFormat, data: &[u8]) {
    let mut input = Input::new(data);
    let limits = PayloadLimits {
        max_readings: usize::from(input.u8()),
        max_fields: usize::from(input.u8()),
        max_device_id_len: usize::from(input.u8()),
    };
    let flags = input.u8();
    let ctx = DecodeContext {
        fallback_device_id: if flags & 2 == 0 { "fuzz-device" } else { "" },
        protocol: SourceProtocol::Mqtt,
        source: "fuzz/topic",
        received_ts_ms: 1_700_000_000_000,
        keep_raw: flags & 1 == 1,
        limits,
    };
    let format = if flags & 4 == 0 { format } else { PayloadFormat::Auto };
    let payload = input.rest();
    if let Some(records) = decode_checked(format, payload, &ctx) {
        let actual = resolve_format(format, payload);
        let again = match actual {
            PayloadFormat::Protobuf => as_protobuf(&records),
            _ => as_json(&records),
        };
        let ctx = DecodeContext { keep_raw: false, ..ctx };
        let records_again = decode_checked(actual, &again, &ctx).unwrap_or_else(|| {
            panic!("records written back as {actual:?} do not decode: {}", String::from_utf8_lossy(&again))
        });
        assert_eq!(records.len(), records_again.len());
        for (record, again) in records.iter().zip(&records_again) {
            let record = Record { raw: Vec::new(), ..record.clone() };
            // Compared encoded: a protobuf number may be NaN, which is not equal to itself.
            assert_eq!(record.encode_to_vec(), again.encode_to_vec(), "{record:?} came back as {again:?}");
        }
    }
}

/// Decodes `payload` behind a record already in the output and checks the outcome; the new
/// records on success.
pub(super) fn decode_checked(
    format: PayloadFormat,
    payload: &[u8],
    ctx: &DecodeContext<'_>,
) -> Option<Vec<Record>> {
    let earlier = Record { device_id: "earlier".into(), ..Record::default() };
    let mut out = vec![earlier.clone()];
    let result = decode(format, payload, ctx, &mut out);
    assert_eq!(out[0], earlier, "decoding changed a record before its own");
    if let Err(error) = result {
        assert_eq!(out.len(), 1, "a failed decode left {} records ({error})", out.len() - 1);
        let _ = error.to_string();
        return None;
    }
    let records = out.split_off(1);
    let limits = ctx.limits;
    // One reading on its own is not a batch: `max_readings` bounds batches.
    assert!(records.len() <= limits.max_readings.max(1), "{} readings above the limit", records.len());
    for record in &records {
        assert!(!record.device_id.is_empty(), "a record without device id");
        assert!(record.device_id.len() <= limits.max_device_id_len, "device id over the limit");
        let fields = record.metrics.len() + record.tags.len();
        assert!(fields <= limits.max_fields, "{fields} fields above the limit of {}", limits.max_fields);
        assert!(record.seq.is_none_or(|seq| seq <= i64::MAX as u64), "seq {:?} out of range", record.seq);
        assert_eq!(record.received_ts_ms, ctx.received_ts_ms);
        assert_eq!(record.protocol, ctx.protocol as i32);
        assert_eq!(record.source, ctx.source);
        let raw: &[u8] = if ctx.keep_raw { payload } else { &[] };
        assert_eq!(record.raw, raw, "raw payload");
        if resolve_format(format, payload) == PayloadFormat::Json {
            for value in record.metrics.values() {
                if let Some(Kind::Number(n)) = value.kind {
                    assert!(n.is_finite(), "JSON metric {n} is not finite");
                }
            }
        }
    }
    Some(records)
}

fn reading(record: &Record) -> Reading {
    Reading {
        device_id: record.device_id.clone(),
        seq: record.seq,
        ts_ms: record.device_ts_ms,
        metrics: record.metrics.clone(),
        tags: record.tags.clone(),
    }
}

/// The records as a device would send them in protobuf: one reading, or a batch.
fn as_protobuf(records: &[Record]) -> Vec<u8> {
    let body = match records {
        [one] => Body::Reading(reading(one)),
        many => Body::Batch(ReadingBatch {
            device_id: String::new(),
            readings: many.iter().map(reading).collect(),
        }),
    };
    DevicePayload { body: Some(body) }.encode_to_vec()
}

/// The records as a device would send them in JSON: one reading object, or an array of them.
fn as_json(records: &[Record]) -> Vec<u8> {
    let object = |record: &Record| {
        let mut reading = Map::new();
        reading.insert("device_id".into(), record.device_id.clone().into());
        if let Some(seq) = record.seq {
            reading.insert("seq".into(), seq.into());
        }
        if let Some(ts) = record.device_ts_ms {
            reading.insert("ts".into(), ts.into());
        }
        let metrics: Map<String, Value> = record
            .metrics
            .iter()
            .filter_map(|(name, value)| {
                let value = match value.kind.as_ref()? {
                    Kind::Number(n) => serde_json::Number::from_f64(*n)?.into(),
                    Kind::Flag(b) => Value::Bool(*b),
                    Kind::Text(t) => Value::String(t.clone()),
                };
                Some((name.clone(), value))
            })
            .collect();
        reading.insert("metrics".into(), metrics.into());
        let tags: Map<String, Value> =
            record.tags.iter().map(|(name, value)| (name.clone(), value.clone().into())).collect();
        reading.insert("tags".into(), tags.into());
        Value::Object(reading)
    };
    let value = match records {
        [one] => object(one),
        many => Value::Array(many.iter().map(object).collect()),
    };
    serde_json::to_vec(&value).expect("JSON values serialize")
}
