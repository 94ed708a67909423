//! `weir-load copy-baseline`: the raw binary COPY weir's PostgreSQL sink is measured against.
//! It builds the rows weir would write for the flood's devices (from the same JSON readings,
//! through weir's own decoder) and writes them with tokio-postgres' `BinaryCopyInWriter`, in
//! batches over a few concurrent connections, each batch its own transaction:
//!
//! - by default the way weir's sink does: binary COPY into the temporary table `weir_staging`
//!   (`LIKE {table}`, `ON COMMIT DELETE ROWS`), then `INSERT INTO {table} … SELECT … FROM
//!   weir_staging ON CONFLICT (device_id, seq) DO NOTHING`, then COMMIT;
//! - with `--direct`, binary COPY straight into the table and COMMIT: the database's limit.

use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use hdrhistogram::Histogram;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::{Client, Statement};

use crate::baseline::{device_prefix, SimulatedDevice};
use crate::kafka::protocol_name;
use crate::postgres::{
    check_table_name, connect, create_table, write_metrics_json, Jsonb, Timestamptz, COLUMNS, COLUMN_TYPES,
    DEFAULT_URL, STAGING_TABLE,
};
use crate::report::{DeviceCount, DeviceCounts, FloodReport, LatencySummary, Scenario};

/// Largest latency the histogram holds (10 min, in microseconds); larger samples saturate.
const LATENCY_MAX_MICROS: u64 = 600_000_000;

/// Options of `weir-load copy-baseline`. [`CopyBaselineParams::default`] gives the CLI defaults.
#[derive(Debug, Clone, clap::Args)]
pub struct CopyBaselineParams {
    /// PostgreSQL connection URL (no TLS).
    #[arg(long, default_value = DEFAULT_URL)]
    pub url: String,
    /// Table to write to; created as weir's sink creates it if missing. Lower-case letters,
    /// digits and `_`.
    #[arg(long, default_value = "telemetry")]
    pub table: String,
    /// Simulated devices: rows are for `{prefix}-{i}`, each device's seqs 1, 2, 3, …
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub devices: u32,
    /// Size of the device JSON reading each row is built from (as `weir-load flood` sends).
    #[arg(long, default_value_t = 128)]
    pub payload_bytes: usize,
    /// Writing time: no batch starts after it; the batches under way are committed.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Rows per batch (one COPY and one transaction each).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: u32,
    /// Concurrent connections, each writing its batches one after another. Devices are spread
    /// over them (device i on connection i mod N); at most one connection per device.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub connections: u32,
    /// COPY straight into the table (no staging table, no ON CONFLICT): the database's limit.
    #[arg(long)]
    pub direct: bool,
    /// Device ids are `{prefix}-{i}`; default `copy-{unix time}`. Letters, digits, `-`, `_`, `.`.
    #[arg(long)]
    pub device_prefix: Option<String>,
    /// Name of the run in the report; default `raw-copy`, or `raw-copy-direct` with `--direct`.
    #[arg(long)]
    pub label: Option<String>,
}

impl Default for CopyBaselineParams {
    /// The CLI defaults, taken from the clap attributes so there is one copy of them.
    fn default() -> Self {
        use clap::{Args, FromArgMatches};
        let matches = Self::augment_args(clap::Command::new("copy-baseline"))
            .try_get_matches_from(["copy-baseline"])
            .expect("every copy-baseline option has a default");
        Self::from_arg_matches(&matches).expect("the defaults parse")
    }
}

impl CopyBaselineParams {
    /// `--label`, or the default for the write path.
    pub fn label(&self) -> String {
        match &self.label {
            Some(label) => label.clone(),
            None if self.direct => "raw-copy-direct".to_owned(),
            None => "raw-copy".to_owned(),
        }
    }
}

/// One connection and the devices whose rows it writes.
struct Lane {
    client: Client,
    /// `COPY weir_staging|{table} (…) FROM STDIN (FORMAT binary)`.
    copy: Statement,
    /// The staging path's `INSERT … SELECT … ON CONFLICT DO NOTHING`; `None` with `--direct`.
    insert: Option<Statement>,
    devices: Vec<SimulatedDevice>,
}

/// What one lane did.
struct LaneOutcome {
    /// Every device's highest seq written and highest seq committed.
    devices: Vec<(String, DeviceCount)>,
    /// Rows in committed batches.
    committed: u64,
    /// Rows the committed INSERTs (or direct COPYs) reported added.
    inserted: u64,
    /// Rows written into the batch that failed, if one did (the lane stops there).
    failed: u64,
    error: Option<String>,
    /// Start of each batch to its COMMIT's completion, in microseconds.
    latency: Histogram<u64>,
    last_commit_at: Option<Instant>,
}

/// Writes for the configured time and reports like `weir-load flood` at QoS 1: `sent` rows
/// written into a COPY, `acked` rows in committed transactions, latency per batch from its first
/// row to its COMMIT, `errors` rows of failed batches; [`FloodReport::devices`] has each
/// device's counts (`acked_through`: every seq up to it is committed).
pub async fn run(params: CopyBaselineParams) -> anyhow::Result<FloodReport> {
    let table = params.table.as_str();
    check_table_name(table)?;
    let prefix = device_prefix(params.device_prefix.as_deref(), "copy")?;
    let label = params.label();
    let lane_count = params.connections.min(params.devices) as usize;
    let mut lane_devices: Vec<Vec<SimulatedDevice>> = (0..lane_count).map(|_| Vec::new()).collect();
    for i in 0..params.devices as usize {
        lane_devices[i % lane_count]
            .push(SimulatedDevice::new(format!("{prefix}-{i}"), params.payload_bytes)?);
    }

    // Every connection is open, and its statements prepared, before the clock starts.
    let copy_target = if params.direct { table } else { STAGING_TABLE };
    let copy_sql = format!("COPY {copy_target} ({COLUMNS}) FROM STDIN (FORMAT binary)");
    let insert_sql = format!(
        "INSERT INTO {table} ({COLUMNS}) SELECT {COLUMNS} FROM {STAGING_TABLE} \
         ON CONFLICT (device_id, seq) DO NOTHING"
    );
    let mut lanes = Vec::with_capacity(lane_count);
    for devices in lane_devices {
        let client = connect(&params.url).await?;
        if lanes.is_empty() {
            create_table(&client, table, false).await?;
        }
        let insert = if params.direct {
            None
        } else {
            client
                .batch_execute(&format!(
                    "CREATE TEMP TABLE IF NOT EXISTS {STAGING_TABLE} (LIKE {table} INCLUDING DEFAULTS) \
                     ON COMMIT DELETE ROWS"
                ))
                .await
                .context("creating the staging table")?;
            Some(client.prepare(&insert_sql).await.with_context(|| format!("preparing {insert_sql}"))?)
        };
        let copy = client.prepare(&copy_sql).await.with_context(|| format!("preparing {copy_sql}"))?;
        lanes.push(Lane { client, copy, insert, devices });
    }
    eprintln!(
        "copy-baseline: {} devices into {table} ({}) at {} over {lane_count} connections, batch={} \
         payload={}B duration={}s prefix={prefix} label={label}",
        params.devices,
        if params.direct { "direct COPY" } else { "COPY to weir_staging + INSERT ON CONFLICT" },
        params.url,
        params.batch,
        params.payload_bytes,
        params.duration_secs,
    );

    let duration = Duration::from_secs(params.duration_secs);
    let start = Instant::now();
    let deadline = start + duration;
    let committed = Arc::new(AtomicU64::new(0));
    let reporter = tokio::spawn(report_progress(Arc::clone(&committed), start));
    let tasks: Vec<_> = lanes
        .into_iter()
        .map(|lane| tokio::spawn(run_lane(lane, params.batch, deadline, Arc::clone(&committed))))
        .collect();
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        outcomes.push(task.await.context("a copy-baseline connection task panicked")?);
    }
    reporter.abort();

    let mut latency = new_histogram();
    let mut devices = DeviceCounts::new();
    let (mut sent, mut acked, mut inserted, mut failed) = (0u64, 0u64, 0u64, 0u64);
    let mut last_commit_at = None;
    for outcome in outcomes {
        if let Some(error) = &outcome.error {
            eprintln!(
                "copy-baseline: a connection stopped after a failed batch of {} rows: {error}",
                outcome.failed
            );
        }
        latency.add(&outcome.latency).context("merging latency histograms")?;
        sent += outcome.devices.iter().map(|(_, count)| count.sent).sum::<u64>();
        acked += outcome.committed;
        inserted += outcome.inserted;
        failed += outcome.failed;
        last_commit_at = last_commit_at.max(outcome.last_commit_at);
        devices.extend(outcome.devices);
    }
    if inserted != acked {
        eprintln!(
            "copy-baseline: WARNING {acked} rows committed but {inserted} added: {} were already in \
             {table} (same device ids and seqs; pass a fresh --device-prefix)",
            acked.saturating_sub(inserted)
        );
    }
    let elapsed =
        last_commit_at.map_or(deadline, |at| at.max(deadline)).saturating_duration_since(start).as_secs_f64();
    let msgs_per_sec = if elapsed > 0.0 { acked as f64 / elapsed } else { 0.0 };
    eprintln!(
        "copy-baseline: done: sent={sent} committed={acked} failed={failed} elapsed={elapsed:.3}s \
         rate={msgs_per_sec:.0}/s"
    );
    Ok(FloodReport {
        label,
        host_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        scenario: Scenario {
            connections: params.devices as usize,
            qos: 1,
            payload_bytes: params.payload_bytes,
            duration_secs: params.duration_secs,
        },
        sent,
        acked,
        errors: failed,
        elapsed_secs: (elapsed * 1000.0).round() / 1000.0,
        msgs_per_sec: msgs_per_sec.round(),
        ack_latency_ms: LatencySummary::from_micros(&latency),
        first_seq: 1,
        last_seq_per_device_max: devices.values().map(|d| d.sent).max().unwrap_or(0),
        reconnects: 0,
        resent: 0,
        targets: Vec::new(),
        target_cpu_secs: None,
        cpu_us_per_msg: None,
        devices,
    })
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_MICROS, 3).expect("constant histogram bounds are valid")
}

/// Writes batches one after another until the deadline, or until one fails.
async fn run_lane(
    mut lane: Lane,
    batch: u32,
    deadline: Instant,
    committed_total: Arc<AtomicU64>,
) -> LaneOutcome {
    let mut outcome = LaneOutcome {
        devices: Vec::new(),
        committed: 0,
        inserted: 0,
        failed: 0,
        error: None,
        latency: new_histogram(),
        last_commit_at: None,
    };
    let mut next_device = 0usize;
    let mut json = JsonBuffers::default();
    // Per device, the last seq in a committed batch. Batches run one at a time, so after a
    // commit everything written so far is committed.
    let mut acked_through = vec![0u64; lane.devices.len()];
    while Instant::now() < deadline {
        let started = Instant::now();
        let result = write_batch(&mut lane, batch, &mut next_device, &mut json).await;
        let now = Instant::now();
        match result {
            Ok(inserted) => {
                let micros = now.saturating_duration_since(started).as_micros() as u64;
                outcome.latency.saturating_record(micros.clamp(1, LATENCY_MAX_MICROS));
                outcome.committed += u64::from(batch);
                outcome.inserted += inserted;
                outcome.last_commit_at = Some(now);
                committed_total.fetch_add(u64::from(batch), Ordering::Relaxed);
                for (acked, device) in acked_through.iter_mut().zip(&lane.devices) {
                    *acked = device.seq;
                }
            }
            Err(error) => {
                outcome.error = Some(format!("{error:#}"));
                break;
            }
        }
    }
    outcome.devices = lane
        .devices
        .iter()
        .zip(acked_through)
        .map(|(device, acked_through)| (device.id.clone(), DeviceCount { sent: device.seq, acked_through }))
        .collect();
    let sent: u64 = outcome.devices.iter().map(|(_, count)| count.sent).sum();
    outcome.failed = sent - outcome.committed;
    outcome
}

/// The metrics and tags JSON of the row being written, reused from row to row.
#[derive(Default)]
struct JsonBuffers {
    metrics: Vec<u8>,
    tags: Vec<u8>,
}

/// One transaction: `batch` rows, round-robin over the lane's devices from `next_device`, into
/// a binary COPY, then (staging path) the INSERT, then COMMIT. Returns the rows added.
async fn write_batch(
    lane: &mut Lane,
    batch: u32,
    next_device: &mut usize,
    json: &mut JsonBuffers,
) -> anyhow::Result<u64> {
    let transaction = lane.client.transaction().await.context("BEGIN")?;
    let sink = transaction.copy_in(&lane.copy).await.context("starting the COPY")?;
    let mut writer = pin!(BinaryCopyInWriter::new(sink, &COLUMN_TYPES));
    let device_count = lane.devices.len();
    for _ in 0..batch {
        let device = &mut lane.devices[*next_device];
        *next_device = (*next_device + 1) % device_count;
        let seq = device.seq + 1;
        let ts_ms =
            SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default();
        let record = device.record_for(seq, ts_ms);
        json.metrics.clear();
        write_metrics_json(&record.metrics, &mut json.metrics);
        json.tags.clear();
        serde_json::to_writer(&mut json.tags, &record.tags).context("encoding tags")?;
        let seq_value = record.seq.map(|seq| seq as i64);
        let device_ts = record.device_ts_ms.map(Timestamptz::from_unix_millis);
        let received_ts = Timestamptz::from_unix_millis(record.received_ts_ms);
        let raw = (!record.raw.is_empty()).then_some(record.raw.as_slice());
        writer
            .as_mut()
            .write(&[
                &record.device_id,
                &seq_value,
                &device_ts,
                &received_ts,
                &protocol_name(record.protocol()),
                &record.source,
                &Jsonb(&json.metrics),
                &Jsonb(&json.tags),
                &raw,
            ])
            .await
            .context("writing a row into the COPY")?;
        device.seq = seq;
    }
    let copied = writer.finish().await.context("finishing the COPY")?;
    let added = match &lane.insert {
        Some(insert) => transaction.execute(insert, &[]).await.context("INSERT from the staging table")?,
        None => copied,
    };
    transaction.commit().await.context("COMMIT")?;
    Ok(added)
}

/// Prints the committed total and the rate of the last second to stderr once a second.
async fn report_progress(committed: Arc<AtomicU64>, start: Instant) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    let mut last = 0u64;
    loop {
        ticker.tick().await;
        let now = committed.load(Ordering::Relaxed);
        eprintln!(
            "copy-baseline: t={:.0}s committed={now} rate={}/s",
            start.elapsed().as_secs_f64(),
            now - last
        );
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_params_are_the_cli_defaults() {
        let params = CopyBaselineParams::default();
        assert_eq!(params.url, "postgres://weir@127.0.0.1:5433/weir");
        assert_eq!(params.table, "telemetry");
        assert_eq!((params.devices, params.batch, params.connections), (100, 4096, 4));
        assert_eq!((params.duration_secs, params.payload_bytes, params.direct), (10, 128, false));
        assert_eq!(params.label(), "raw-copy");
        let direct = CopyBaselineParams { direct: true, ..CopyBaselineParams::default() };
        assert_eq!(direct.label(), "raw-copy-direct");
    }
}
