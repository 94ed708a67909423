//! The PostgreSQL projection of a record: the one table definition that weir's PostgreSQL sink
//! creates and writes, and that weir-load's raw COPY baseline reproduces.

/// The columns, in the order weir COPYs them.
pub const COLUMNS: &str = "device_id, seq, device_ts, received_ts, protocol, source, metrics, tags, raw";

/// The temporary table each batch is copied into before the deduplicating insert.
pub const STAGING_TABLE: &str = "weir_staging";

/// Creates the records table `table` and its `(device_id, device_ts)` index `index`, if missing.
/// Both names must already be safe SQL (checked identifiers, quoted as the caller needs).
pub fn create_table_sql(table: &str, index: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (
    device_id   text        NOT NULL,
    seq         bigint,
    device_ts   timestamptz,
    received_ts timestamptz NOT NULL,
    protocol    text        NOT NULL,
    source      text        NOT NULL,
    metrics     jsonb       NOT NULL,
    tags        jsonb       NOT NULL,
    raw         bytea,
    UNIQUE (device_id, seq)
);
CREATE INDEX IF NOT EXISTS {index} ON {table} (device_id, device_ts);"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_column_is_defined_and_the_dedupe_key_is_unique() {
        let sql = create_table_sql("t", "t_device_ts");
        for column in COLUMNS.split(", ") {
            assert!(sql.contains(&format!("\n    {column} ")), "{column} missing");
        }
        assert!(sql.contains("UNIQUE (device_id, seq)"));
        assert!(sql.contains("CREATE INDEX IF NOT EXISTS t_device_ts ON t (device_id, device_ts)"));
    }
}
