//! Payload decoding into records, as the gateway does it per message: `payload::decode` with a
//! `DecodeContext`, into a records Vec that is reused (the gateway drains it into fabric items;
//! here it is cleared, so dropping the records is measured too).
//!
//! `cargo bench -p weir-protocols --bench payload`; docs/benches.md has figures.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prost::Message;
use weir_proto::v1::device_payload::Body;
use weir_proto::{
    metric_value::Kind, DevicePayload, MetricValue, Reading, ReadingBatch, Record, SourceProtocol,
};
use weir_protocols::payload::{self, DecodeContext, PayloadFormat, PayloadLimits};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEVICE: &str = "load-1700000000-42";
const TS_MS: u64 = 1_700_000_000_123;
/// Readings in the batch form.
const BATCH: usize = 10;

/// One reading as load-tests/src/payload.rs (`TelemetryPayload::build`) writes it, padded with
/// the `pad` metric to exactly `target` bytes.
fn json_reading(seq: u64, target: usize) -> Vec<u8> {
    let head = format!(
        r#"{{"device_id":"{DEVICE}","seq":{seq},"ts":{TS_MS},"metrics":{{"temp":21.5,"hum":40.1,"pad":""#
    );
    let tail = r#""}}"#;
    let pad = target.saturating_sub(head.len() + tail.len());
    format!("{head}{}{tail}", "x".repeat(pad)).into_bytes()
}

/// `{"device_id", "readings": [...]}` with `BATCH` readings of two metrics.
fn json_batch() -> Vec<u8> {
    let readings: Vec<String> = (0..BATCH)
        .map(|i| {
            format!(
                r#"{{"seq":{},"ts":{},"metrics":{{"temp":21.5,"hum":40.1}}}}"#,
                1000 + i,
                TS_MS + i as u64
            )
        })
        .collect();
    format!(r#"{{"device_id":"{DEVICE}","readings":[{}]}}"#, readings.join(",")).into_bytes()
}

fn reading(device_id: &str, seq: u64, pad: Option<String>) -> Reading {
    let number = |n| MetricValue { kind: Some(Kind::Number(n)) };
    let mut metrics = std::collections::BTreeMap::from([
        ("temp".to_owned(), number(21.5)),
        ("hum".to_owned(), number(40.1)),
    ]);
    if let Some(pad) = pad {
        metrics.insert("pad".to_owned(), MetricValue { kind: Some(Kind::Text(pad)) });
    }
    Reading {
        device_id: device_id.to_owned(),
        seq: Some(seq),
        ts_ms: Some(TS_MS as i64 + seq as i64),
        metrics,
        tags: Default::default(),
    }
}

/// The JSON reading's content as a protobuf `DevicePayload` (its pad as a text metric).
fn protobuf_reading() -> Vec<u8> {
    let body = Body::Reading(reading(DEVICE, 123_456, Some("x".repeat(40))));
    DevicePayload { body: Some(body) }.encode_to_vec()
}

/// The JSON batch's content as a protobuf `DevicePayload` batch.
fn protobuf_batch() -> Vec<u8> {
    let readings = (0..BATCH).map(|i| reading("", 1000 + i as u64, None)).collect();
    DevicePayload { body: Some(Body::Batch(ReadingBatch { device_id: DEVICE.to_owned(), readings })) }
        .encode_to_vec()
}

fn decode(c: &mut Criterion) {
    let cases = [
        ("json_reading_128B", PayloadFormat::Json, json_reading(123_456, 128)),
        ("json_batch_10", PayloadFormat::Json, json_batch()),
        ("protobuf_reading", PayloadFormat::Protobuf, protobuf_reading()),
        ("protobuf_batch_10", PayloadFormat::Protobuf, protobuf_batch()),
        // What a listener with `payload = "auto"` (the default) does with the JSON reading.
        ("auto_json_reading_128B", PayloadFormat::Auto, json_reading(123_456, 128)),
    ];
    let ctx = DecodeContext {
        fallback_device_id: "client-7",
        protocol: SourceProtocol::Mqtt,
        source: "devices/load-1700000000-42/telemetry",
        received_ts_ms: 1_700_000_000_500,
        keep_raw: false,
        limits: PayloadLimits::default(),
    };
    let mut group = c.benchmark_group("payload_decode");
    group.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1)).sample_size(30);
    let mut records: Vec<Record> = Vec::new();
    for (name, format, bytes) in cases {
        // Check the fixture decodes, and to how many records.
        payload::decode(format, &bytes, &ctx, &mut records).expect("fixture decodes");
        let count = records.len() as u64;
        records.clear();
        group.throughput(Throughput::ElementsAndBytes { elements: count, bytes: bytes.len() as u64 });
        group.bench_function(name, |b| {
            b.iter(|| {
                payload::decode(format, black_box(&bytes), &ctx, &mut records).expect("decodes");
                black_box(&records);
                records.clear();
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
