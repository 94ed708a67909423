//! `weir-load sqlite-baseline`: raw SQLite inserts, the baseline weir's SQLite sink is measured
//! against. It builds the rows weir would write for the flood's devices (from the same JSON
//! readings, through weir's own decoder) and writes them the way weir's sink does
//! (`gateway/src/sink/sqlite.rs`): one connection, `journal_mode = WAL`, `synchronous = FULL`
//! (weir's default), weir's table, index and dead-letter table, and per batch one
//! `BEGIN IMMEDIATE` transaction of single-row prepared `INSERT … ON CONFLICT (device_id, seq)
//! DO NOTHING` statements, then COMMIT. No network, no MQTT, no batching wait: the file's limit
//! on this machine, with weir's write path.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use rusqlite::{params, Connection, TransactionBehavior};
use weir_protocols::record_json::{protocol_name, write_metrics_json, write_tags_json};

use crate::baseline::{device_prefix, SimulatedDevice};
use crate::report::{DeviceCount, DeviceCounts, FloodReport, LatencySummary, Scenario};

/// weir's SQLite schema, word for word (`SCHEMA` in `gateway/src/sink/sqlite.rs`; a test
/// checks it is still there).
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS telemetry (
    id             INTEGER PRIMARY KEY,
    device_id      TEXT    NOT NULL,
    seq            INTEGER,
    device_ts_ms   INTEGER,
    received_ts_ms INTEGER NOT NULL,
    protocol       TEXT    NOT NULL,
    source         TEXT    NOT NULL,
    metrics        TEXT    NOT NULL,
    tags           TEXT    NOT NULL,
    raw            BLOB,
    UNIQUE (device_id, seq)
);
CREATE INDEX IF NOT EXISTS telemetry_device_ts ON telemetry (device_id, device_ts_ms);
CREATE TABLE IF NOT EXISTS dead_letter (
    id             INTEGER PRIMARY KEY,
    received_ts_ms INTEGER NOT NULL,
    device_id      TEXT    NOT NULL,
    protocol       TEXT    NOT NULL,
    source         TEXT    NOT NULL,
    error          TEXT    NOT NULL,
    raw            BLOB    NOT NULL
);
";

/// weir's insert, word for word (`INSERT_RECORD` in `gateway/src/sink/sqlite.rs`).
pub const INSERT_RECORD: &str = "INSERT INTO telemetry
    (device_id, seq, device_ts_ms, received_ts_ms, protocol, source, metrics, tags, raw)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
    ON CONFLICT (device_id, seq) DO NOTHING";

/// The table weir writes records to.
pub const TABLE: &str = "telemetry";

/// weir's busy timeout (no other writer here, so it never fires).
const BUSY_TIMEOUT: Duration = Duration::from_millis(100);

/// Largest latency the histogram holds (10 min, in microseconds); larger samples saturate.
const LATENCY_MAX_MICROS: u64 = 600_000_000;

/// `PRAGMA synchronous`, as weir's `[sink] synchronous`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Synchronous {
    /// fsync on every commit (weir's default).
    Full,
    /// fsync at checkpoints only.
    Normal,
}

impl Synchronous {
    fn pragma_value(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        }
    }
}

/// Options of `weir-load sqlite-baseline`.
#[derive(Debug, Clone, clap::Args)]
pub struct SqliteBaselineParams {
    /// Database file to create (with weir's schema). It must not exist, unless `--recreate`.
    #[arg(long)]
    pub db: PathBuf,
    /// Delete the database file (and its `-wal`/`-shm` files) first, so the run starts empty.
    #[arg(long)]
    pub recreate: bool,
    /// Simulated devices: rows are for `{prefix}-{i}`, each device's seqs 1, 2, 3, …, written
    /// round-robin.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub devices: u32,
    /// Size of the device JSON reading each row is built from (as `weir-load flood` sends).
    #[arg(long, default_value_t = 128)]
    pub payload_bytes: usize,
    /// Writing time: no batch starts after it; the batch under way is committed.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Rows per batch (one transaction each). weir's batcher closes a batch at 4096 records
    /// (`[fabric] batch_max_records`); under load its sink driver also merges batches already
    /// waiting up to 8192 records per transaction (group commit), which `--batch 8192` mimics.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: u32,
    /// `PRAGMA synchronous`, as weir's `[sink] synchronous` (default full).
    #[arg(long, value_enum, default_value_t = Synchronous::Full)]
    pub synchronous: Synchronous,
    /// Device ids are `{prefix}-{i}`; default `sqlite-{unix time}`. Letters, digits, `-`, `_`,
    /// `.`.
    #[arg(long)]
    pub device_prefix: Option<String>,
    /// Name of the run in the report.
    #[arg(long, default_value = "raw-sqlite")]
    pub label: String,
}

impl SqliteBaselineParams {
    /// The CLI defaults, writing to `db`.
    pub fn new(db: impl Into<PathBuf>) -> Self {
        use clap::{Args, FromArgMatches};
        let db: PathBuf = db.into();
        let matches = Self::augment_args(clap::Command::new("sqlite-baseline"))
            .try_get_matches_from([std::ffi::OsStr::new("sqlite-baseline"), "--db".as_ref(), db.as_os_str()])
            .expect("every other sqlite-baseline option has a default");
        Self::from_arg_matches(&matches).expect("the defaults parse")
    }
}

/// Writes for the configured time and reports like `weir-load flood` at QoS 1: `sent` rows
/// inserted into a transaction, `acked` rows in committed transactions, latency per batch from
/// its BEGIN to its COMMIT, `errors` rows of a failed batch (the run stops there);
/// [`FloodReport::devices`] has each device's counts (`acked_through`: every seq up to it is
/// committed). Blocking: call it from `spawn_blocking` in async code.
pub fn run(params: SqliteBaselineParams) -> anyhow::Result<FloodReport> {
    let prefix = device_prefix(params.device_prefix.as_deref(), "sqlite")?;
    let mut devices = (0..params.devices as usize)
        .map(|i| SimulatedDevice::new(format!("{prefix}-{i}"), params.payload_bytes))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut conn = open_fresh(&params.db, params.recreate, params.synchronous)?;
    eprintln!(
        "sqlite-baseline: {} devices into {} (WAL, synchronous={}), batch={} payload={}B duration={}s \
         prefix={prefix} label={}",
        params.devices,
        params.db.display(),
        params.synchronous.pragma_value(),
        params.batch,
        params.payload_bytes,
        params.duration_secs,
        params.label,
    );

    let start = Instant::now();
    let deadline = start + Duration::from_secs(params.duration_secs);
    let mut latency = new_histogram();
    let mut rows = RowBuffers::default();
    let mut next_device = 0usize;
    // Per device, the last seq in a committed batch. Batches run one at a time, so after a
    // commit everything written so far is committed.
    let mut acked_through = vec![0u64; devices.len()];
    let (mut committed, mut inserted) = (0u64, 0u64);
    let mut failure = None;
    let mut last_commit_at = None;
    let (mut last_report_at, mut committed_at_last_report) = (start, 0u64);
    while Instant::now() < deadline {
        let started = Instant::now();
        let result = write_batch(&mut conn, &mut devices, params.batch, &mut next_device, &mut rows);
        let now = Instant::now();
        match result {
            Ok(added) => {
                let micros = now.saturating_duration_since(started).as_micros() as u64;
                latency.saturating_record(micros.clamp(1, LATENCY_MAX_MICROS));
                committed += u64::from(params.batch);
                inserted += added;
                last_commit_at = Some(now);
                for (acked, device) in acked_through.iter_mut().zip(&devices) {
                    *acked = device.seq;
                }
            }
            Err(error) => {
                failure = Some(error);
                break;
            }
        }
        if now.saturating_duration_since(last_report_at) >= Duration::from_secs(1) {
            eprintln!(
                "sqlite-baseline: t={:.0}s committed={committed} rate={:.0}/s",
                now.saturating_duration_since(start).as_secs_f64(),
                (committed - committed_at_last_report) as f64
                    / now.saturating_duration_since(last_report_at).as_secs_f64()
            );
            (last_report_at, committed_at_last_report) = (now, committed);
        }
    }

    let devices: DeviceCounts = devices
        .iter()
        .zip(acked_through)
        .map(|(device, acked_through)| (device.id.clone(), DeviceCount { sent: device.seq, acked_through }))
        .collect();
    let sent: u64 = devices.values().map(|count| count.sent).sum();
    let failed = sent - committed;
    if let Some(error) = &failure {
        eprintln!("sqlite-baseline: stopped after a failed batch of {failed} rows: {error:#}");
    }
    if inserted != committed {
        eprintln!(
            "sqlite-baseline: WARNING {committed} rows committed but {inserted} added: {} were already \
             in {} (same device ids and seqs)",
            committed.saturating_sub(inserted),
            params.db.display()
        );
    }
    let elapsed =
        last_commit_at.map_or(deadline, |at| at.max(deadline)).saturating_duration_since(start).as_secs_f64();
    let msgs_per_sec = if elapsed > 0.0 { committed as f64 / elapsed } else { 0.0 };
    eprintln!(
        "sqlite-baseline: done: sent={sent} committed={committed} failed={failed} elapsed={elapsed:.3}s \
         rate={msgs_per_sec:.0}/s"
    );
    Ok(FloodReport {
        label: params.label,
        host_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        scenario: Scenario {
            connections: params.devices as usize,
            qos: 1,
            payload_bytes: params.payload_bytes,
            duration_secs: params.duration_secs,
        },
        sent,
        acked: committed,
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

/// Creates the database at `path` as weir's sink opens its own: busy timeout, WAL, the
/// `synchronous` pragma, the schema. An existing file is an error unless `recreate`.
fn open_fresh(path: &Path, recreate: bool, synchronous: Synchronous) -> anyhow::Result<Connection> {
    if path.exists() {
        if !recreate {
            bail!("{} exists; pass --recreate to start from an empty database", path.display());
        }
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let mut file = path.as_os_str().to_owned();
            file.push(suffix);
            match std::fs::remove_file(&file) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                    return Err(error).with_context(|| format!("removing {}", Path::new(&file).display()));
                }
                _ => {}
            }
        }
    }
    let conn = Connection::open(path).with_context(|| format!("creating {}", path.display()))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .and_then(|_| conn.pragma_update(None, "synchronous", synchronous.pragma_value()))
        .and_then(|_| conn.execute_batch(SCHEMA))
        .with_context(|| format!("preparing {}", path.display()))?;
    Ok(conn)
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_MICROS, 3).expect("constant histogram bounds are valid")
}

/// The metrics and tags JSON of the row being written, reused from row to row (as weir does).
#[derive(Default)]
struct RowBuffers {
    metrics: Vec<u8>,
    tags: Vec<u8>,
}

/// One transaction: `batch` rows, round-robin over the devices from `next_device`. Returns the
/// rows added (duplicates are skipped by the insert, as in weir).
fn write_batch(
    conn: &mut Connection,
    devices: &mut [SimulatedDevice],
    batch: u32,
    next_device: &mut usize,
    rows: &mut RowBuffers,
) -> rusqlite::Result<u64> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let device_count = devices.len();
    let mut added = 0u64;
    {
        let mut insert_record = tx.prepare_cached(INSERT_RECORD)?;
        for _ in 0..batch {
            let device = &mut devices[*next_device];
            *next_device = (*next_device + 1) % device_count;
            let seq = device.seq + 1;
            let ts_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default();
            let record = device.record_for(seq, ts_ms);
            rows.metrics.clear();
            rows.tags.clear();
            write_metrics_json(&record.metrics, &mut rows.metrics);
            write_tags_json(&record.tags, &mut rows.tags);
            let changed = insert_record.execute(params![
                record.device_id,
                record.seq.map(|s| s as i64),
                record.device_ts_ms,
                record.received_ts_ms,
                protocol_name(record.protocol()),
                record.source,
                std::str::from_utf8(&rows.metrics).unwrap_or("{}"),
                std::str::from_utf8(&rows.tags).unwrap_or("{}"),
                (!record.raw.is_empty()).then_some(&record.raw[..]),
            ])?;
            added += changed as u64;
            device.seq = seq;
        }
    }
    tx.commit()?;
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weir-load-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn default_params_are_the_cli_defaults() {
        let params = SqliteBaselineParams::new("/tmp/x.db");
        assert_eq!(params.db, Path::new("/tmp/x.db"));
        assert_eq!(
            (params.devices, params.batch, params.payload_bytes, params.duration_secs),
            (100, 4096, 128, 10)
        );
        assert_eq!(
            (params.synchronous, params.recreate, params.label.as_str()),
            (Synchronous::Full, false, "raw-sqlite")
        );
    }

    #[test]
    fn every_committed_row_is_read_back_by_the_verifier() {
        let dir = temp_dir("sqlite-baseline");
        let db = dir.join("raw.db");
        let mut params = SqliteBaselineParams::new(&db);
        params.devices = 7;
        params.batch = 50;
        params.duration_secs = 1;
        params.device_prefix = Some("raw".into());
        let report = run(params.clone()).unwrap();

        assert_eq!(report.label, "raw-sqlite");
        assert!(report.acked >= 50, "{report:?}");
        assert_eq!((report.sent, report.errors), (report.acked, 0));
        assert_eq!(report.acked % 50, 0, "whole batches");
        assert_eq!(report.devices.len(), 7);
        assert!(report.devices.values().all(|d| d.acked_through == d.sent && d.sent > 0));
        let found = verify::sqlite::read(&db, TABLE).unwrap();
        assert_eq!(found.messages, report.acked);
        let verdict = verify::verdict(&report.devices, &found);
        assert!(verdict.passed(), "{}", verdict.summary_line("raw-sqlite"));
        assert_eq!(verdict.totals.lost, 0);

        // weir's file: WAL, and the dead-letter table is there too.
        let conn = Connection::open(&db).unwrap();
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |row| row.get(0)).unwrap();
        assert_eq!(mode, "wal");
        let dead: i64 = conn.query_row("SELECT count(*) FROM dead_letter", [], |row| row.get(0)).unwrap();
        assert_eq!(dead, 0);
        drop(conn);

        // The file is not overwritten by accident, only on request.
        assert!(format!("{:#}", run(params.clone()).unwrap_err()).contains("--recreate"));
        params.recreate = true;
        params.duration_secs = 0;
        let empty = run(params).unwrap();
        assert_eq!(empty.acked, 0);
        assert_eq!(verify::sqlite::read(&db, TABLE).unwrap().messages, 0, "recreated empty");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The baseline writes as weir's sink does; when the sink changes, this fails, and the
    /// baseline is to follow it.
    #[test]
    fn the_write_path_is_weirs() {
        let sink = include_str!("../../gateway/src/sink/sqlite.rs");
        assert!(sink.contains(&format!("const SCHEMA: &str = \"{SCHEMA}\";")), "weir's SCHEMA changed");
        assert!(
            sink.contains(&format!("const INSERT_RECORD: &str = \"{INSERT_RECORD}\";")),
            "weir's INSERT changed"
        );
        for line in [
            "const BUSY_TIMEOUT: Duration = Duration::from_millis(100);",
            r#"conn.pragma_update(None, "journal_mode", "WAL")"#,
            r#".and_then(|_| conn.pragma_update(None, "synchronous", sync))"#,
            "SqliteSync::Full => \"FULL\",",
            "SqliteSync::Normal => \"NORMAL\",",
            "conn.transaction_with_behavior(TransactionBehavior::Immediate)?;",
            "tx.prepare_cached(INSERT_RECORD)?;",
            "write_metrics_json(&r.metrics, &mut metrics);",
            "write_tags_json(&r.tags, &mut tags);",
            "fn merge_up_to(&self) -> usize {\n        8192\n    }",
        ] {
            assert!(sink.contains(line), "weir's SQLite sink no longer has {line:?}");
        }
        let config = include_str!("../../gateway/src/config.rs");
        assert!(config.contains("pub fn batch_max_records() -> usize {\n        4096\n    }"));
        assert!(config.contains("pub fn sqlite_sync() -> SqliteSync {\n        SqliteSync::Full\n    }"));
    }
}
