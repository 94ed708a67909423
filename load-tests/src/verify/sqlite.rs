//! Reads `(device_id, seq)` of every row of weir's SQLite table back into [`Found`].
//!
//! weir's SQLite sink keeps `UNIQUE (device_id, seq)` and skips a record already there, so a
//! table never shows duplicates: count them with weir's `weir_records_duplicate_total` instead.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rusqlite::{Connection, OpenFlags};

use super::Found;

/// How long a read waits for a writer holding the database lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads `SELECT device_id, seq FROM {table}` from the database file at `path` (read-only; a
/// running weir may keep writing) and counts the seqs per device. A NULL seq counts as
/// `without_seq`, a negative one as undecodable. `table` must be a plain identifier; a missing
/// file or table is an error. Blocking: call it from `spawn_blocking` in async code.
pub fn read(path: &Path, table: &str) -> anyhow::Result<Found> {
    if table.is_empty() || !table.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        bail!("table name {table:?}: use letters, digits and '_' only");
    }
    let started = Instant::now();
    let conn =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .with_context(|| format!("opening {}", path.display()))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mut statement = conn
        .prepare(&format!("SELECT device_id, seq FROM {table}"))
        .with_context(|| format!("reading {table} in {}", path.display()))?;
    let mut rows = statement.query([]).with_context(|| format!("reading {table}"))?;
    let mut found = Found::default();
    while let Some(row) = rows.next().with_context(|| format!("reading {table}"))? {
        let device_id: String = row.get(0).context("reading device_id")?;
        let seq: Option<i64> = row.get(1).context("reading seq")?;
        match seq.map(u64::try_from) {
            None => found.record(&device_id, None),
            Some(Ok(seq)) => found.record(&device_id, Some(seq)),
            Some(Err(_)) => found.record_undecodable(|| {
                format!("{table}: device {device_id} has the negative seq {}", seq.unwrap_or_default())
            }),
        }
    }
    eprintln!(
        "verify: read {} rows from {table} in {} in {:.1}s ({} devices)",
        found.messages,
        path.display(),
        started.elapsed().as_secs_f64(),
        found.devices.len()
    );
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_row_and_classifies_seqs() {
        let dir = std::env::temp_dir().join(format!("weir-load-sqlite-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("telemetry.db");
        let _ = std::fs::remove_file(&path);
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE telemetry (id INTEGER PRIMARY KEY, device_id TEXT NOT NULL, seq INTEGER,
                 UNIQUE (device_id, seq));
             INSERT INTO telemetry (device_id, seq) VALUES ('a', 2), ('a', 1), ('b', 7), ('b', NULL), ('c', -1);",
        )
        .unwrap();
        let found = read(&path, "telemetry").unwrap();
        assert_eq!(found.messages, 5);
        assert_eq!(found.devices["a"], [2, 1]);
        assert_eq!(found.devices["b"], [7]);
        assert_eq!((found.without_seq, found.undecodable), (1, 1));
        assert!(read(&path, "missing").is_err());
        assert!(read(&path, "telemetry; DROP TABLE telemetry").is_err());
        assert!(read(&dir.join("nope.db"), "telemetry").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
