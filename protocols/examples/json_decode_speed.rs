//! Times the JSON payload decoder on typical device payloads and prints ns per message.
//!
//! `cargo run --release -p weir-protocols --example json_decode_speed [messages-per-round]`.
//! Each case runs several rounds and reports the fastest, so a busy machine skews it less.

use std::hint::black_box;
use std::time::{Duration, Instant};

use weir_proto::SourceProtocol;
use weir_protocols::payload::{decode, DecodeContext, PayloadFormat, PayloadLimits};

const FLOOD: &str = r#"{"device_id":"load-1-0","seq":123,"ts":1764158400000,"metrics":{"temp":21.5,"hum":40.1,"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}"#;
const FLAT: &str = r#"{"seq":1,"temp":21.5,"on":true}"#;
const ROUNDS: usize = 7;

fn main() {
    let per_round: usize =
        std::env::args().nth(1).map_or(200_000, |n| n.parse().expect("messages per round"));
    let ctx = DecodeContext {
        fallback_device_id: "client-7",
        protocol: SourceProtocol::Mqtt,
        source: "devices/load-1-0/telemetry",
        received_ts_ms: 1_764_158_400_123,
        keep_raw: false,
        limits: PayloadLimits::default(),
    };
    let batch = batch_of(100);
    let cases: [(&str, &[u8], usize); 3] = [
        ("flood (metrics object)", FLOOD.as_bytes(), per_round),
        ("flat reading", FLAT.as_bytes(), per_round),
        ("batch of 100 readings", batch.as_bytes(), (per_round / 100).max(1)),
    ];
    for (name, payload, messages) in cases {
        let best = (0..ROUNDS).map(|_| time(payload, &ctx, messages)).min().expect("at least one round");
        let ns_per_op = best.as_nanos() as f64 / messages as f64;
        println!("{name:<24} {:>5} bytes  {ns_per_op:>10.1} ns/op", payload.len());
    }
}

/// Decodes `payload` `messages` times, reusing one output vector as a listener does.
fn time(payload: &[u8], ctx: &DecodeContext<'_>, messages: usize) -> Duration {
    let mut out = Vec::new();
    let start = Instant::now();
    for _ in 0..messages {
        out.clear();
        decode(PayloadFormat::Json, black_box(payload), ctx, &mut out).expect("payload decodes");
        black_box(&out);
    }
    start.elapsed()
}

/// `{"device_id":"load-1-0","readings":[...]}` with `n` flood-style readings.
fn batch_of(n: usize) -> String {
    let readings: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"seq":{i},"ts":{},"metrics":{{"temp":21.5,"hum":40.1,"pad":"xxxxxxxxxxxxxxxxxxxx"}}}}"#,
                1_764_158_400_000u64 + i as u64
            )
        })
        .collect();
    format!(r#"{{"device_id":"load-1-0","readings":[{}]}}"#, readings.join(","))
}
