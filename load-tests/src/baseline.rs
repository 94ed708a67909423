//! `weir-load produce-baseline`: the raw Kafka producer weir's Kafka sink is measured against.
//! It writes the records weir would write for the flood's devices (same key, value and headers)
//! straight to Kafka with weir's producer settings, and times each send to its delivery report.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use prost::Message as _;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use weir_proto::{metric_value::Kind, Record, SourceProtocol};
use weir_protocols::payload::{decode, DecodeContext, PayloadFormat, PayloadLimits};

use crate::kafka::{
    create_topic, producer_defaults, protocol_name, CONTENT_TYPE_HEADER, PROTOBUF_CONTENT_TYPE,
    PROTOCOL_HEADER, RECEIVED_MS_HEADER, SOURCE_HEADER,
};
use crate::payload::TelemetryPayload;
use crate::report::{DeviceCount, DeviceCounts, FloodReport, LatencySummary, Scenario};

/// Largest latency the histogram holds (10 min, in microseconds); larger samples saturate.
/// Larger than the flood's: records are retried forever, so a broker hiccup can hold one long.
const LATENCY_MAX_MICROS: u64 = 600_000_000;

/// Records produced between two yields to the runtime when nothing else makes the loop wait.
const YIELD_EVERY: u64 = 256;

/// Options of `weir-load produce-baseline`. [`BaselineParams::default`] gives the CLI defaults.
#[derive(Debug, Clone, clap::Args)]
pub struct BaselineParams {
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Topic to write to; created (replication 1) if missing.
    #[arg(long, default_value = "weir-bench")]
    pub topic: String,
    /// Partitions of the topic when it has to be created.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(i32).range(1..))]
    pub partitions: i32,
    /// Simulated devices: records are keyed `{prefix}-{i}` and produced round-robin.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub devices: u32,
    /// Size of the device JSON reading each record is built from (as `weir-load flood` sends).
    #[arg(long, default_value_t = 128)]
    pub payload_bytes: usize,
    /// Producing time; outstanding deliveries are awaited after it.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Records per second, all devices together; 0 = as fast as the window allows.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Records sent and not yet reported delivered, for the whole producer; sending waits when
    /// it is reached. The default matches 100 MQTT connections with 100 QoS 1 publishes in
    /// flight each, so latencies compare with `weir-load flood`'s.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_inflight: u32,
    /// Device ids are `{prefix}-{i}`; default `raw-{unix time}`. Letters, digits, `-`, `_`, `.`.
    #[arg(long)]
    pub device_prefix: Option<String>,
    /// Name of the run in the report.
    #[arg(long, default_value = "raw-producer")]
    pub label: String,
    /// How long to wait after the producing time for outstanding delivery reports.
    #[arg(long, default_value_t = 30)]
    pub drain_timeout_secs: u64,
    /// Extra librdkafka setting `KEY=VALUE` on top of weir's (for experiments; repeatable).
    #[arg(short = 'X', long = "producer-option", value_parser = parse_setting)]
    pub producer_options: Vec<(String, String)>,
}

impl Default for BaselineParams {
    /// The CLI defaults, taken from the clap attributes so there is one copy of them.
    fn default() -> Self {
        use clap::{Args, FromArgMatches};
        let matches = Self::augment_args(clap::Command::new("produce-baseline"))
            .try_get_matches_from(["produce-baseline"])
            .expect("every produce-baseline option has a default");
        Self::from_arg_matches(&matches).expect("the defaults parse")
    }
}

fn parse_setting(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

/// The device id prefix: `given`, or `{stem}-{unix time}` so reruns into a persistent sink are
/// not deduplicated away. Letters, digits, `-`, `_` and `.` only (ids need no escaping).
pub(crate) fn device_prefix(given: Option<&str>, stem: &str) -> anyhow::Result<String> {
    let prefix = match given {
        Some(prefix) => prefix.to_owned(),
        None => {
            let unix_now =
                SystemTime::now().duration_since(UNIX_EPOCH).context("system clock is before 1970")?;
            format!("{stem}-{}", unix_now.as_secs())
        }
    };
    if prefix.is_empty()
        || !prefix.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        bail!("--device-prefix {prefix:?}: use letters, digits, '-', '_' and '.' only");
    }
    Ok(prefix)
}

/// One simulated device: the record weir would make of its readings, updated per message.
/// Shared with the raw COPY baseline (`copy_baseline`).
pub(crate) struct SimulatedDevice {
    pub(crate) id: String,
    /// The MQTT topic the flood's device publishes to: the record's `source`.
    pub(crate) source: String,
    payload: TelemetryPayload,
    record: Record,
    /// The last seq produced (0 before the first).
    pub(crate) seq: u64,
}

impl SimulatedDevice {
    pub(crate) fn new(id: String, payload_bytes: usize) -> anyhow::Result<Self> {
        let source = format!("devices/{id}/telemetry");
        let payload = TelemetryPayload::new(id.clone(), payload_bytes);
        // The template is what weir's own decoder makes of the flood's first reading; later
        // records change only seq, timestamps and the pad (see `record_for`).
        let ctx = DecodeContext {
            fallback_device_id: &id,
            protocol: SourceProtocol::Mqtt,
            source: &source,
            received_ts_ms: 0,
            keep_raw: false,
            limits: PayloadLimits::default(),
        };
        let mut records = Vec::with_capacity(1);
        decode(PayloadFormat::Json, &payload.build(1, 0), &ctx, &mut records)
            .with_context(|| format!("decoding device {id}'s reading with weir's decoder"))?;
        let record = records.pop().context("a reading decodes into one record")?;
        Ok(Self { id, source, payload, record, seq: 0 })
    }

    /// The record weir would write for this device's reading `seq` sent and received at `ts_ms`.
    pub(crate) fn record_for(&mut self, seq: u64, ts_ms: u64) -> &Record {
        self.record.seq = Some(seq);
        self.record.device_ts_ms = Some(ts_ms as i64);
        self.record.received_ts_ms = ts_ms as i64;
        let pad_len = self.payload.pad_len(seq, ts_ms);
        if let Some(Kind::Text(pad)) = self.record.metrics.get_mut("pad").and_then(|m| m.kind.as_mut()) {
            if pad.len() > pad_len {
                pad.truncate(pad_len);
            } else {
                pad.extend(std::iter::repeat_n('x', pad_len - pad.len()));
            }
        }
        &self.record
    }
}

/// What travels with each record to its delivery report.
struct InFlight {
    device: usize,
    seq: u64,
    sent_at: std::time::Instant,
}

/// The producer context: counts delivery reports, times them, and frees window slots.
struct DeliveryTracker {
    window: Arc<Semaphore>,
    delivered: AtomicU64,
    failed: AtomicU64,
    acked_through: Vec<AtomicU64>,
    log: Mutex<DeliveryLog>,
}

/// Written by librdkafka's polling thread only; read at the end.
struct DeliveryLog {
    latency: Histogram<u64>,
    last_delivery_at: Option<std::time::Instant>,
    first_error: Option<String>,
}

impl ClientContext for DeliveryTracker {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        use RDKafkaLogLevel::{Alert, Critical, Emerg, Error, Warning};
        if matches!(level, Emerg | Alert | Critical | Error | Warning) {
            eprintln!("produce-baseline: librdkafka {facility}: {message}");
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        eprintln!("produce-baseline: librdkafka error: {error}: {reason}");
    }
}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = Box<InFlight>;

    fn delivery(&self, result: &DeliveryResult<'_>, in_flight: Box<InFlight>) {
        let now = std::time::Instant::now();
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(_) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
                // Per partition, and so per device, reports come in produce order.
                self.acked_through[in_flight.device].fetch_max(in_flight.seq, Ordering::Relaxed);
                let micros = now.saturating_duration_since(in_flight.sent_at).as_micros() as u64;
                log.latency.saturating_record(micros.clamp(1, LATENCY_MAX_MICROS));
                log.last_delivery_at = Some(now);
            }
            Err((error, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                if log.first_error.is_none() {
                    log.first_error = Some(error.to_string());
                }
            }
        }
        drop(log);
        self.window.add_permits(1);
    }
}

/// Produces for the configured time, waits (bounded) for every delivery report, and reports like
/// `weir-load flood` at QoS 1: `sent` records handed to librdkafka, `acked` delivered, latency
/// from send to delivery report, `errors` records that failed or were not reported delivered
/// by the drain timeout; [`FloodReport::devices`] has each device's counts.
pub async fn run(params: BaselineParams) -> anyhow::Result<FloodReport> {
    let prefix = device_prefix(params.device_prefix.as_deref(), "raw")?;
    let status = create_topic(&params.brokers, &params.topic, params.partitions, false).await?;
    eprintln!("produce-baseline: topic {} on {}: {status:?}", params.topic, params.brokers);

    let mut devices = (0..params.devices as usize)
        .map(|i| SimulatedDevice::new(format!("{prefix}-{i}"), params.payload_bytes))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let window = Arc::new(Semaphore::new(params.max_inflight as usize));
    let tracker = DeliveryTracker {
        window: Arc::clone(&window),
        delivered: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        acked_through: (0..devices.len()).map(|_| AtomicU64::new(0)).collect(),
        log: Mutex::new(DeliveryLog {
            latency: Histogram::new_with_bounds(1, LATENCY_MAX_MICROS, 3)
                .expect("constant histogram bounds are valid"),
            last_delivery_at: None,
            first_error: None,
        }),
    };
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &params.brokers).set("client.id", "weir-load-baseline");
    for (key, value) in producer_defaults() {
        config.set(key, value);
    }
    for (key, value) in &params.producer_options {
        config.set(key, value);
    }
    let producer: ThreadedProducer<DeliveryTracker> =
        config.create_with_context(tracker).context("creating the Kafka producer")?;
    // Connect and learn the partition leaders before the clock starts, as the flood connects
    // every device before its common start.
    {
        let producer = producer.clone();
        let topic = params.topic.clone();
        tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(Some(&topic), Duration::from_secs(10))
        })
        .await
        .context("the metadata thread panicked")?
        .context("reading the topic metadata")?;
    }
    eprintln!(
        "produce-baseline: {} devices to {} topic {} payload={}B duration={}s rate={} max_inflight={} \
         prefix={prefix} label={}",
        devices.len(),
        params.brokers,
        params.topic,
        params.payload_bytes,
        params.duration_secs,
        if params.rate == 0 { "max".to_owned() } else { format!("{}/s", params.rate) },
        params.max_inflight,
        params.label
    );

    let duration = Duration::from_secs(params.duration_secs);
    let start = Instant::now();
    let deadline = start + duration;
    let context = producer.context();
    let reporter = tokio::spawn(report_progress(producer.clone(), start));
    let mut produced = 0u64;
    let mut since_yield = 0u64;
    let mut encoded = Vec::with_capacity(params.payload_bytes + 128);
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if params.rate > 0 {
            // Scheduled from the start, so a slow send is caught up.
            let due = start + Duration::from_secs_f64(produced as f64 / params.rate as f64);
            if due >= deadline {
                break;
            }
            if due > now {
                tokio::time::sleep_until(due).await;
            }
        }
        match window.try_acquire() {
            Ok(permit) => permit.forget(),
            Err(_) => tokio::select! {
                permit = window.acquire() => permit.context("the delivery window closed")?.forget(),
                () = tokio::time::sleep_until(deadline) => break,
            },
        }

        let device_index = (produced % devices.len() as u64) as usize;
        let device = &mut devices[device_index];
        let seq = device.seq + 1;
        let ts_ms =
            SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default();
        encoded.clear();
        device.record_for(seq, ts_ms).encode(&mut encoded).context("encoding a record")?;
        let received_ms = ts_ms.to_string();
        let headers = OwnedHeaders::new_with_capacity(4)
            .insert(Header { key: CONTENT_TYPE_HEADER, value: Some(PROTOBUF_CONTENT_TYPE) })
            .insert(Header { key: PROTOCOL_HEADER, value: Some(protocol_name(SourceProtocol::Mqtt)) })
            .insert(Header { key: SOURCE_HEADER, value: Some(device.source.as_str()) })
            .insert(Header { key: RECEIVED_MS_HEADER, value: Some(received_ms.as_str()) });
        let in_flight = Box::new(InFlight { device: device_index, seq, sent_at: std::time::Instant::now() });
        let mut record = BaseRecord::with_opaque_to(&params.topic, in_flight)
            .key(device.id.as_str())
            .payload(encoded.as_slice())
            .headers(headers);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                // librdkafka's queue is larger than the window by default; only an overriding
                // setting gets here. Wait for the polling thread to make room.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((error, _)) => bail!("producing to {}: {error}", params.topic),
            }
        }
        device.seq = seq;
        produced += 1;
        since_yield += 1;
        if since_yield == YIELD_EVERY {
            since_yield = 0;
            tokio::task::yield_now().await;
        }
    }

    // Every slot back means every record has its delivery report.
    let drain = Duration::from_secs(params.drain_timeout_secs);
    let drained = tokio::time::timeout(drain, window.acquire_many(params.max_inflight)).await;
    let finished_at = std::time::Instant::now();
    reporter.abort();
    let delivered = context.delivered.load(Ordering::SeqCst);
    let failed = context.failed.load(Ordering::SeqCst);
    let undelivered = produced.saturating_sub(delivered + failed);
    if drained.is_err() {
        eprintln!(
            "produce-baseline: {undelivered} records still undelivered at the drain timeout ({drain:?})"
        );
    }
    let log = context.log.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(error) = &log.first_error {
        eprintln!("produce-baseline: {failed} deliveries failed, e.g. {error}");
    }
    let start = start.into_std();
    let elapsed = log
        .last_delivery_at
        .map_or(finished_at, |at| at.max(start + duration))
        .saturating_duration_since(start)
        .as_secs_f64();
    let msgs_per_sec = if elapsed > 0.0 { delivered as f64 / elapsed } else { 0.0 };
    eprintln!(
        "produce-baseline: done: sent={produced} delivered={delivered} failed={failed} elapsed={elapsed:.3}s \
         rate={msgs_per_sec:.0}/s"
    );
    let device_counts: DeviceCounts = devices
        .iter()
        .zip(&context.acked_through)
        .map(|(d, acked)| {
            (d.id.clone(), DeviceCount { sent: d.seq, acked_through: acked.load(Ordering::SeqCst) })
        })
        .collect();
    let report = FloodReport {
        label: params.label.clone(),
        host_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        scenario: Scenario {
            connections: devices.len(),
            qos: 1,
            payload_bytes: params.payload_bytes,
            duration_secs: params.duration_secs,
        },
        sent: produced,
        acked: delivered,
        errors: failed + undelivered,
        elapsed_secs: (elapsed * 1000.0).round() / 1000.0,
        msgs_per_sec: msgs_per_sec.round(),
        ack_latency_ms: LatencySummary::from_micros(&log.latency),
        first_seq: 1,
        last_seq_per_device_max: devices.iter().map(|d| d.seq).max().unwrap_or(0),
        reconnects: 0,
        resent: 0,
        targets: Vec::new(),
        target_cpu_secs: None,
        cpu_us_per_msg: None,
        devices: device_counts,
    };
    drop(log);
    // Dropping the producer purges whatever is still queued (only after a drain timeout).
    drop(producer);
    Ok(report)
}

/// Prints totals and the delivery rate of the last second to stderr once a second.
async fn report_progress(producer: ThreadedProducer<DeliveryTracker>, start: Instant) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    let mut last_delivered = 0u64;
    loop {
        ticker.tick().await;
        let context = producer.context();
        let delivered = context.delivered.load(Ordering::Relaxed);
        eprintln!(
            "produce-baseline: t={:.0}s delivered={delivered} failed={} in_flight={} rate={}/s",
            start.elapsed().as_secs_f64(),
            context.failed.load(Ordering::Relaxed),
            producer.in_flight_count(),
            delivered - last_delivered,
        );
        last_delivered = delivered;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_match_what_weirs_decoder_makes_of_the_flood_reading() {
        for payload_bytes in [0, 128, 512] {
            let mut device = SimulatedDevice::new("raw-1700000000-3".into(), payload_bytes).unwrap();
            for (seq, ts) in
                [(1, 1_700_000_000_000), (10, 1_700_000_000_001), (1_234_567, 1_800_000_000_000), (2, 5)]
            {
                let ours = device.record_for(seq, ts).clone();
                let ctx = DecodeContext {
                    fallback_device_id: "raw-1700000000-3",
                    protocol: SourceProtocol::Mqtt,
                    source: "devices/raw-1700000000-3/telemetry",
                    received_ts_ms: ts as i64,
                    keep_raw: false,
                    limits: PayloadLimits::default(),
                };
                let mut weirs = Vec::new();
                decode(PayloadFormat::Json, &device.payload.build(seq, ts), &ctx, &mut weirs).unwrap();
                assert_eq!(weirs, vec![ours], "payload {payload_bytes} seq {seq}");
            }
        }
    }

    #[test]
    fn default_params_are_the_cli_defaults() {
        let params = BaselineParams::default();
        assert_eq!(params.brokers, "127.0.0.1:9092");
        assert_eq!((params.devices, params.max_inflight, params.partitions), (100, 10_000, 6));
        assert_eq!((params.rate, params.duration_secs, params.payload_bytes), (0, 10, 128));
        assert_eq!(params.label, "raw-producer");
        assert!(params.producer_options.is_empty());
    }

    #[test]
    fn device_prefix_defaults_to_the_stem_and_the_time_and_rejects_odd_characters() {
        assert_eq!(device_prefix(Some("bench-1.x_2"), "raw").unwrap(), "bench-1.x_2");
        let default = device_prefix(None, "copy").unwrap();
        assert!(default.strip_prefix("copy-").unwrap().bytes().all(|b| b.is_ascii_digit()), "{default}");
        for bad in ["", "a b", "a/b", "ä", "a\"\"b"] {
            assert!(device_prefix(Some(bad), "raw").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn producer_options_are_key_value_pairs() {
        assert_eq!(parse_setting("linger.ms=0"), Ok(("linger.ms".into(), "0".into())));
        assert_eq!(parse_setting("client.id="), Ok(("client.id".into(), String::new())));
        assert!(parse_setting("linger.ms").is_err());
        assert!(parse_setting("=1").is_err());
    }
}
