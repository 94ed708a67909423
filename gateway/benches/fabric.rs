//! The fabric and the batcher: `Fabric::try_send_now` alone (routing by device id, the shard's
//! record and byte budget, the channel), and records/s through fabric + `run_batcher` into a
//! sink that drops each batch (a blackhole: the batch's drop returns the shard's room), with
//! source awareness off and on (`[sources] max_devices = 0` or the default).
//!
//! `cargo bench -p weir --bench fabric`; docs/benches.md has figures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tokio::runtime::Runtime;
use tokio::sync::Notify;
use weir::config::{FabricConfig, SourcesConfig, WhenFull};
use weir::fabric::{run_batcher, BatchLimits, Fabric, Item, MessageMeta, SendError, ShardReceiver};
use weir::metrics::Metrics;
use weir::sources::Sources;
use weir_proto::{metric_value::Kind, MetricValue, Record, SourceProtocol};
use weir_protocols::payload::PayloadFormat;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Distinct devices the records come from (round robin, each device's seq in order).
const DEVICES: usize = 1000;

/// Makes records as the JSON decoder does from the load generator's 128-byte reading: one
/// record per message, each the first item of its message.
struct Records {
    device_ids: Vec<String>,
    next_seq: Vec<u64>,
    next_device: usize,
}

impl Records {
    fn new() -> Self {
        let device_ids = (0..DEVICES).map(|i| format!("load-1700000000-{i}")).collect();
        Self { device_ids, next_seq: vec![1; DEVICES], next_device: 0 }
    }

    fn items(&mut self, count: usize) -> Vec<Item> {
        let number = |n| MetricValue { kind: Some(Kind::Number(n)) };
        (0..count)
            .map(|_| {
                let device = self.next_device;
                self.next_device = (device + 1) % DEVICES;
                let seq = self.next_seq[device];
                self.next_seq[device] += 1;
                let device_id = self.device_ids[device].clone();
                let record = Record {
                    source: format!("devices/{device_id}/telemetry"),
                    device_id,
                    seq: Some(seq),
                    device_ts_ms: Some(1_700_000_000_000 + seq as i64),
                    received_ts_ms: 1_700_000_000_005 + seq as i64,
                    protocol: SourceProtocol::Mqtt as i32,
                    metrics: [
                        ("temp".to_owned(), number(21.5)),
                        ("hum".to_owned(), number(40.1)),
                        ("pad".to_owned(), MetricValue { kind: Some(Kind::Text("x".repeat(40))) }),
                    ]
                    .into(),
                    ..Record::default()
                };
                // No ack token: `ack = "received"`, or QoS 0.
                Item::record(record, None).of_message(MessageMeta { bytes: 128, format: PayloadFormat::Json })
            })
            .collect()
    }
}

/// `try_send_now` into 4 shards; the items are taken out again and their room returned
/// outside the measured time.
fn try_send_now(c: &mut Criterion) {
    const SHARDS: usize = 4;
    const PER_ITER: usize = 4096;
    let config = FabricConfig::default();
    let (fabric, shards) =
        Fabric::new(SHARDS, config.max_records, config.max_bytes, WhenFull::Block, Arc::new(Metrics::new()));
    let mut records = Records::new();
    let mut group = c.benchmark_group("fabric");
    group.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1)).sample_size(20);
    group.throughput(Throughput::Elements(PER_ITER as u64));
    group.bench_function("try_send_now_4_shards", |b| {
        b.iter_custom(|iters| {
            let mut measured = Duration::ZERO;
            for _ in 0..iters {
                let items = records.items(PER_ITER);
                let start = Instant::now();
                for item in items {
                    if fabric.try_send_now(item).is_err() {
                        panic!("the fabric has room for every item");
                    }
                }
                measured += start.elapsed();
                drain(&shards);
            }
            measured
        })
    });
    group.finish();
}

fn drain(shards: &[ShardReceiver]) {
    for shard in shards {
        for item in shard.items_rx.try_iter() {
            shard.budget.release(1, item.bytes);
        }
    }
}

/// How many records the sink has been handed.
#[derive(Default)]
struct Delivered {
    records: AtomicU64,
    notify: Notify,
}

/// One shard, its batcher and a blackhole sink on a current-thread runtime: producer, batcher
/// and sink share one thread, so the time is the CPU cost per record of the whole hand-off.
struct Pipeline {
    runtime: Runtime,
    fabric: Fabric,
    delivered: Arc<Delivered>,
}

impl Pipeline {
    fn new(source_awareness: bool) -> Self {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_time().build().expect("tokio runtime");
        let config = FabricConfig::default();
        let metrics = Arc::new(Metrics::new());
        let (fabric, mut shards) =
            Fabric::new(1, config.max_records, config.max_bytes, config.when_full, Arc::clone(&metrics));
        let limits = BatchLimits {
            max_records: config.batch_max_records,
            max_bytes: config.batch_max_bytes,
            linger: Duration::from_millis(config.linger_ms),
        };
        let observer = source_awareness.then(|| (Sources::new(1, SourcesConfig::default(), metrics), 0));
        let (batches_tx, batches_rx) = flume::bounded(1);
        let shard = shards.pop().expect("one shard");
        runtime.spawn(run_batcher(shard, limits, batches_tx, observer));
        let delivered = Arc::new(Delivered::default());
        let sink = Arc::clone(&delivered);
        runtime.spawn(async move {
            while let Ok(batch) = batches_rx.recv_async().await {
                let records = batch.len() as u64;
                drop(batch);
                sink.records.fetch_add(records, Ordering::Relaxed);
                sink.notify.notify_one();
            }
        });
        Self { runtime, fabric, delivered }
    }

    /// Sends `items` as connections do (`try_send_now`, waiting with `send` when the shard is
    /// full), yielding every 64 records as a connection does between reads, and returns once
    /// the sink has every one.
    fn run(&self, items: Vec<Item>) {
        let target = self.delivered.records.load(Ordering::Relaxed) + items.len() as u64;
        self.runtime.block_on(async {
            for (i, item) in items.into_iter().enumerate() {
                match self.fabric.try_send_now(item) {
                    Ok(()) => {}
                    Err(SendError::Full(item)) => {
                        if self.fabric.send(item).await.is_err() {
                            panic!("fabric closed");
                        }
                    }
                    Err(SendError::Closed(_)) => panic!("fabric closed"),
                }
                if i % 64 == 63 {
                    tokio::task::yield_now().await;
                }
            }
            while self.delivered.records.load(Ordering::Relaxed) < target {
                self.delivered.notify.notified().await;
            }
        });
    }
}

fn fabric_and_batcher(c: &mut Criterion) {
    // Two whole batches (4096 records each, the default `batch_max_records`): every batch
    // closes full, so no iteration waits out the linger.
    let per_iter = 2 * FabricConfig::default().batch_max_records;
    let mut group = c.benchmark_group("fabric_batcher");
    group.measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1)).sample_size(20);
    group.throughput(Throughput::Elements(per_iter as u64));
    for (name, source_awareness) in [("sources_off", false), ("sources_on", true)] {
        let pipeline = Pipeline::new(source_awareness);
        let mut records = Records::new();
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut measured = Duration::ZERO;
                for _ in 0..iters {
                    let items = records.items(per_iter);
                    let start = Instant::now();
                    pipeline.run(items);
                    measured += start.elapsed();
                }
                measured
            })
        });
    }
    group.finish();
}

criterion_group!(benches, try_send_now, fabric_and_batcher);
criterion_main!(benches);
