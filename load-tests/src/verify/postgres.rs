//! Reads `(device_id, seq)` of every row of weir's PostgreSQL table back into [`Found`].

use std::time::Instant;

use anyhow::Context;

use super::Found;
use crate::postgres::{check_table_name, connect};

/// Rows fetched per round trip from the server-side cursor.
const FETCH_ROWS: i32 = 50_000;

/// Reads `SELECT device_id, seq FROM {table}` (only the rows of `devices` when given, with
/// `WHERE device_id = ANY($1)`) through a cursor, `FETCH_ROWS` rows at a time, and counts the
/// seqs per device. A NULL seq counts as `without_seq`, a negative one as undecodable.
/// `table` must be a plain lower-case identifier; a missing table is an error.
pub async fn consume(url: &str, table: &str, devices: Option<&[String]>) -> anyhow::Result<Found> {
    check_table_name(table)?;
    let mut client = connect(url).await?;
    // A portal lives in a transaction; REPEATABLE READ reads one snapshot throughout.
    let transaction = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .context("BEGIN")?;
    let started = Instant::now();
    let portal = match devices {
        Some(devices) => {
            let statement = transaction
                .prepare(&format!("SELECT device_id, seq FROM {table} WHERE device_id = ANY($1)"))
                .await
                .with_context(|| format!("reading {table}"))?;
            transaction.bind(&statement, &[&devices]).await
        }
        None => {
            let statement = transaction
                .prepare(&format!("SELECT device_id, seq FROM {table}"))
                .await
                .with_context(|| format!("reading {table}"))?;
            transaction.bind(&statement, &[]).await
        }
    }
    .with_context(|| format!("reading {table}"))?;
    let mut found = Found::default();
    loop {
        let rows = transaction
            .query_portal(&portal, FETCH_ROWS)
            .await
            .with_context(|| format!("reading {table}"))?;
        if rows.is_empty() {
            break;
        }
        for row in &rows {
            let device_id: &str = row.try_get(0).context("reading device_id")?;
            let seq: Option<i64> = row.try_get(1).context("reading seq")?;
            match seq.map(u64::try_from) {
                None => found.record(device_id, None),
                Some(Ok(seq)) => found.record(device_id, Some(seq)),
                Some(Err(_)) => found.record_undecodable(|| {
                    format!("{table}: device {device_id} has the negative seq {}", seq.unwrap_or_default())
                }),
            }
        }
        if found.messages % 1_000_000 < rows.len() as u64 {
            eprintln!("verify: {} rows read from {table}", found.messages);
        }
    }
    transaction.commit().await.context("COMMIT")?;
    eprintln!(
        "verify: read {} rows from {table} in {:.1}s ({} devices{})",
        found.messages,
        started.elapsed().as_secs_f64(),
        found.devices.len(),
        match devices {
            Some(devices) => format!(", filtered to the {} expected", devices.len()),
            None => String::new(),
        }
    );
    Ok(found)
}
