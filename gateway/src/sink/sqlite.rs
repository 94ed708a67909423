//! The embedded SQLite sink (the default): one writer, WAL mode, one transaction per batch,
//! UNIQUE(device_id, seq) with duplicates ignored, and a dead-letter table in the same file.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, TransactionBehavior};

use super::{protocol_name, Pending, Sink, SinkError, WriteReport};
use crate::config::{SqliteSinkConfig, SqliteSync};
use crate::fabric::{Batch, DeadLetter, Payload};
use weir_protocols::record_json::{write_metrics_json, write_tags_json};

const SCHEMA: &str = "
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

const INSERT_RECORD: &str = "INSERT INTO telemetry
    (device_id, seq, device_ts_ms, received_ts_ms, protocol, source, metrics, tags, raw)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
    ON CONFLICT (device_id, seq) DO NOTHING";

const INSERT_DEAD_LETTER: &str = "INSERT INTO dead_letter
    (received_ts_ms, device_id, protocol, source, error, raw) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

/// Waiting on another writer's lock this long yields a retriable error, so the driver backs off
/// and the pressure reaches the devices instead of piling up here.
const BUSY_TIMEOUT: Duration = Duration::from_millis(100);

pub struct SqliteSink {
    /// Used from a blocking thread during each write; the driver writes one batch at a time.
    conn: Arc<Mutex<Connection>>,
}

impl SqliteSink {
    /// Opens (creating if missing) the database at `data_dir/path` and its tables.
    pub fn open(data_dir: &Path, config: &SqliteSinkConfig) -> Result<Self, String> {
        let path = data_dir.join(&config.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        let conn = Connection::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let sync = match config.synchronous {
            SqliteSync::Full => "FULL",
            SqliteSync::Normal => "NORMAL",
        };
        conn.busy_timeout(BUSY_TIMEOUT).map_err(|e| e.to_string())?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .and_then(|_| conn.pragma_update(None, "synchronous", sync))
            .and_then(|_| conn.execute_batch(SCHEMA))
            .map_err(|e| format!("cannot prepare {}: {e}", path.display()))?;
        Ok(Self { conn: Arc::new(Mutex::new(conn)) })
    }
}

impl Sink for SqliteSink {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn merge_up_to(&self) -> usize {
        8192
    }

    async fn submit(&mut self, batch: Arc<Batch>) -> Result<Pending, SinkError> {
        let conn = Arc::clone(&self.conn);
        let write = tokio::task::spawn_blocking(move || {
            // A panic inside a write rolls its transaction back; the connection stays usable.
            let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            write_batch(&mut conn, &batch)
        });
        Ok(Box::pin(async move {
            match write.await {
                Ok(result) => result.map_err(classify),
                Err(e) => Err(SinkError::Fatal(format!("sqlite writer failed: {e}"))),
            }
        }))
    }
}

fn write_batch(conn: &mut Connection, batch: &Batch) -> rusqlite::Result<WriteReport> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut report = WriteReport::default();
    {
        let mut insert_record = tx.prepare_cached(INSERT_RECORD)?;
        let mut insert_dead_letter = tx.prepare_cached(INSERT_DEAD_LETTER)?;
        let mut metrics = Vec::with_capacity(256);
        let mut tags = Vec::with_capacity(64);
        for item in &batch.items {
            match &item.payload {
                Payload::Record(r) => {
                    metrics.clear();
                    tags.clear();
                    write_metrics_json(&r.metrics, &mut metrics);
                    write_tags_json(&r.tags, &mut tags);
                    let changed = insert_record.execute(params![
                        r.device_id,
                        r.seq.map(|s| s as i64),
                        r.device_ts_ms,
                        r.received_ts_ms,
                        protocol_name(r.protocol()),
                        r.source,
                        // Built from serde_json string escapes: always valid UTF-8.
                        std::str::from_utf8(&metrics).unwrap_or("{}"),
                        std::str::from_utf8(&tags).unwrap_or("{}"),
                        (!r.raw.is_empty()).then_some(&r.raw[..]),
                    ])?;
                    report.records += 1;
                    if changed == 0 {
                        report.duplicates += 1;
                    }
                }
                Payload::DeadLetter(DeadLetter {
                    device_id,
                    protocol,
                    source,
                    error,
                    raw,
                    received_ts_ms,
                }) => {
                    insert_dead_letter.execute(params![
                        received_ts_ms,
                        device_id,
                        protocol_name(*protocol),
                        source,
                        error,
                        &raw[..],
                    ])?;
                    report.dead_letters += 1;
                }
            }
        }
    }
    tx.commit()?;
    Ok(report)
}

fn classify(error: rusqlite::Error) -> SinkError {
    match error.sqlite_error_code() {
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => {
            SinkError::Fatal(format!("sqlite: {error}"))
        }
        // Busy/locked (another writer), disk full, I/O errors: may pass.
        _ => SinkError::Retriable(format!("sqlite: {error}")),
    }
}
