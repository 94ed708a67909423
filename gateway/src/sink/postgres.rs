//! The PostgreSQL sink: each batch is one transaction — binary COPY into a temporary staging
//! table, then `INSERT … SELECT … ON CONFLICT (device_id, seq) DO NOTHING`. A batch the database
//! rejects for its data is bisected until the bad rows are isolated; they go to the dead-letter
//! table with the database's error and the good rows commit.

use std::error::Error as StdError;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use futures_util::pin_mut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::config::SslMode;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use tokio_postgres::{Client, NoTls, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;
use weir_proto::Record;

use super::{protocol_name, Pending, Sink, SinkError, WriteReport};
use crate::config::PostgresSinkConfig;
use crate::fabric::{Batch, DeadLetter, Payload};
use crate::metrics::Metrics;
use weir_protocols::record_json::{write_metrics_json, write_tags_json};
use weir_protocols::record_sql::{create_table_sql, COLUMNS, STAGING_TABLE};

const COLUMN_TYPES: [Type; 9] = [
    Type::TEXT,
    Type::INT8,
    Type::TIMESTAMPTZ,
    Type::TIMESTAMPTZ,
    Type::TEXT,
    Type::TEXT,
    Type::JSONB,
    Type::JSONB,
    Type::BYTEA,
];

/// PostgreSQL's timestamptz range in milliseconds since the Unix epoch (4713 BC to 294276 AD).
const PG_MIN_MS: i64 = -210_866_803_200_000;
const PG_MAX_MS: i64 = 9_224_318_016_000_000;
/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// Checks a table name: an identifier, optionally schema-qualified (`schema.table`).
pub fn check_table_name(name: &str) -> Result<(), String> {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() > 2 {
        return Err("use table or schema.table".into());
    }
    for part in parts {
        let mut chars = part.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if !first_ok || part.len() > 63 || !part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err("names are 1 to 63 of A-Z a-z 0-9 _ and do not start with a digit".into());
        }
    }
    Ok(())
}

/// `schema.table` quoted for SQL (checked names only, so quoting cannot be escaped).
fn quoted(name: &str) -> String {
    name.split('.').map(|p| format!("\"{p}\"")).collect::<Vec<_>>().join(".")
}

/// Milliseconds since the Unix epoch as a binary timestamptz.
#[derive(Debug)]
struct Timestamp(i64);

impl ToSql for Timestamp {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        let micros = self.0.checked_mul(1000).ok_or("timestamp out of range")?;
        out.put_i64(micros - PG_EPOCH_OFFSET_US);
        Ok(IsNull::No)
    }
    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ
    }
    to_sql_checked!();
}

/// JSON text as a binary jsonb value (format version 1, then the text).
#[derive(Debug)]
struct Jsonb<'a>(&'a [u8]);

impl ToSql for Jsonb<'_> {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        out.put_u8(1);
        out.put_slice(self.0);
        Ok(IsNull::No)
    }
    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }
    to_sql_checked!();
}

struct Statements {
    create: String,
    staging: String,
    copy: String,
    insert: String,
    dead_letter: String,
}

/// A pooled connection with its statements prepared once.
struct Conn {
    client: Client,
    copy: Statement,
    insert: Statement,
}

struct Shared {
    config: PostgresSinkConfig,
    pg_config: tokio_postgres::Config,
    /// Set when the URL asks for TLS (`sslmode=require`); weir never falls back to plain text.
    tls: Option<MakeRustlsConnect>,
    sql: Statements,
    /// Idle connections; a write takes one and gives it back unless it broke.
    idle: Mutex<Vec<Conn>>,
    metrics: Arc<Metrics>,
}

pub struct PostgresSink {
    shared: Arc<Shared>,
}

impl PostgresSink {
    /// Prepares the sink. Connecting is lazy: a database that is down at start delays the first
    /// commit (devices see backpressure), not the start.
    pub fn open(config: &PostgresSinkConfig, metrics: Arc<Metrics>) -> Result<Self, String> {
        let mut pg_config: tokio_postgres::Config =
            config.url.parse().map_err(|e| format!("postgres url: {e}"))?;
        pg_config.connect_timeout(Duration::from_millis(config.connect_timeout_ms));
        if pg_config.get_application_name().is_none() {
            pg_config.application_name("weir");
        }
        let table = quoted(&config.table);
        let dead = quoted(&config.dead_letter_table);
        let index = quoted(&format!("{}_device_ts", config.table.rsplit('.').next().unwrap_or("telemetry")));
        let sql = Statements {
            create: format!(
                "{}
                 CREATE TABLE IF NOT EXISTS {dead} (
                    received_ts timestamptz NOT NULL,
                    device_id   text        NOT NULL,
                    protocol    text        NOT NULL,
                    source      text        NOT NULL,
                    error       text        NOT NULL,
                    raw         bytea       NOT NULL);",
                create_table_sql(&table, &index)
            ),
            staging: format!(
                "CREATE TEMPORARY TABLE IF NOT EXISTS {STAGING_TABLE} (LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            ),
            copy: format!("COPY {STAGING_TABLE} ({COLUMNS}) FROM STDIN (FORMAT binary)"),
            insert: format!(
                "INSERT INTO {table} ({COLUMNS}) SELECT {COLUMNS} FROM {STAGING_TABLE} ON CONFLICT (device_id, seq) DO NOTHING"
            ),
            dead_letter: format!(
                "INSERT INTO {dead} (received_ts, device_id, protocol, source, error, raw) VALUES ($1, $2, $3, $4, $5, $6)"
            ),
        };
        let tls = match pg_config.get_ssl_mode() {
            SslMode::Require => Some(tls_connector(config)?),
            _ => None,
        };
        metrics.sink_connected.set(0);
        Ok(Self {
            shared: Arc::new(Shared {
                config: config.clone(),
                pg_config,
                tls,
                sql,
                idle: Mutex::new(Vec::new()),
                metrics,
            }),
        })
    }
}

/// A rustls connector that verifies the server against `tls_ca_file` or the system's roots.
fn tls_connector(config: &PostgresSinkConfig) -> Result<MakeRustlsConnect, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match &config.tls_ca_file {
        Some(path) => {
            let shown = path.display();
            for cert in
                CertificateDer::pem_file_iter(path).map_err(|e| format!("tls_ca_file {shown}: {e}"))?
            {
                let cert = cert.map_err(|e| format!("tls_ca_file {shown}: {e}"))?;
                roots.add(cert).map_err(|e| format!("tls_ca_file {shown}: {e}"))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                // A system root rustls cannot parse is skipped, as browsers do.
                let _ = roots.add(cert);
            }
        }
    }
    if roots.is_empty() {
        return Err("no CA certificates to verify the PostgreSQL server with (set tls_ca_file)".into());
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(tls))
}

impl Sink for PostgresSink {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn max_in_flight(&self) -> usize {
        self.shared.config.pool_size
    }

    fn merge_up_to(&self) -> usize {
        8192
    }

    async fn submit(&mut self, batch: Arc<Batch>) -> Result<Pending, SinkError> {
        let shared = Arc::clone(&self.shared);
        Ok(Box::pin(async move { shared.write(&batch).await }))
    }
}

/// A dead letter to write: from the fabric (undecodable) or a row the database refused.
struct Letter<'a> {
    received_ts_ms: i64,
    device_id: &'a str,
    protocol: &'a str,
    source: &'a str,
    error: String,
    raw: &'a [u8],
}

impl Shared {
    async fn connect(&self) -> Result<Conn, SinkError> {
        let failed = |e: tokio_postgres::Error| {
            self.metrics.sink_connected.set(0);
            SinkError::Retriable(format!("postgres connect: {e}"))
        };
        let client = match &self.tls {
            None => {
                let (client, connection) = self.pg_config.connect(NoTls).await.map_err(failed)?;
                tokio::spawn(log_end(connection));
                client
            }
            Some(tls) => {
                let (client, connection) = self.pg_config.connect(tls.clone()).await.map_err(failed)?;
                tokio::spawn(log_end(connection));
                client
            }
        };
        client.batch_execute(&self.sql.create).await.map_err(|e| retriable("creating tables", &e))?;
        client
            .batch_execute(&self.sql.staging)
            .await
            .map_err(|e| retriable("creating the staging table", &e))?;
        let copy = client.prepare(&self.sql.copy).await.map_err(|e| retriable("preparing COPY", &e))?;
        let insert = client.prepare(&self.sql.insert).await.map_err(|e| retriable("preparing INSERT", &e))?;
        self.metrics.sink_connected.set(1);
        Ok(Conn { client, copy, insert })
    }

    async fn conn(&self) -> Result<Conn, SinkError> {
        let idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
        match idle {
            Some(conn) if !conn.client.is_closed() => Ok(conn),
            _ => self.connect().await,
        }
    }

    fn give_back(&self, conn: Conn) {
        if conn.client.is_closed() {
            self.metrics.sink_connected.set(0);
        } else {
            self.idle.lock().unwrap_or_else(PoisonError::into_inner).push(conn);
        }
    }

    async fn write(&self, batch: &Batch) -> Result<WriteReport, SinkError> {
        let mut records = Vec::with_capacity(batch.len());
        let mut letters = Vec::new();
        for item in &batch.items {
            match &item.payload {
                Payload::Record(r) => match out_of_range(r) {
                    None => records.push(r),
                    Some(error) => letters.push(record_letter(r, error)),
                },
                Payload::DeadLetter(d) => letters.push(fabric_letter(d)),
            }
        }
        let mut conn = self.conn().await?;
        let result = self.write_all(&mut conn, &records, letters).await;
        match &result {
            Ok(_) => {
                self.metrics.sink_connected.set(1);
                self.give_back(conn);
            }
            Err(error) => {
                // The server may have restarted: every pooled connection is suspect. Reconnect
                // on the next attempt; until one succeeds, readiness says so.
                tracing::debug!(%error, "postgres write failed");
                self.metrics.sink_connected.set(0);
                self.idle.lock().unwrap_or_else(PoisonError::into_inner).clear();
            }
        }
        result
    }

    /// Writes the records and letters; on a data error, isolates the rows the database refuses.
    async fn write_all<'a>(
        &self,
        conn: &mut Conn,
        records: &[&'a Record],
        mut letters: Vec<Letter<'a>>,
    ) -> Result<WriteReport, SinkError> {
        match self.transaction(conn, records, &letters).await {
            Ok(inserted) => {
                return Ok(WriteReport {
                    records: records.len(),
                    duplicates: records.len() - inserted,
                    dead_letters: letters.len(),
                })
            }
            Err(e) if !is_data_error(&e) => return Err(retriable("writing a batch", &e)),
            Err(_) => {}
        }
        // Some row is refused for its data: halve until every refused row stands alone. Good
        // halves commit as they go; the refused rows and the letters commit last.
        let mut report = WriteReport::default();
        let mut pending = vec![records];
        while let Some(part) = pending.pop() {
            match self.transaction(conn, part, &[]).await {
                Ok(inserted) => {
                    report.records += part.len();
                    report.duplicates += part.len() - inserted;
                }
                Err(e) if !is_data_error(&e) => return Err(retriable("writing part of a batch", &e)),
                Err(e) if part.len() == 1 => {
                    let error = database_error(&e);
                    tracing::warn!(device = part[0].device_id, seq = part[0].seq, %error, "row refused by PostgreSQL; dead-lettered");
                    letters.push(record_letter(part[0], error));
                }
                Err(_) => {
                    let (left, right) = part.split_at(part.len() / 2);
                    pending.push(right);
                    pending.push(left);
                }
            }
        }
        self.transaction(conn, &[], &letters).await.map_err(|e| retriable("writing dead letters", &e))?;
        report.dead_letters = letters.len();
        Ok(report)
    }

    /// One transaction: COPY `records` into staging, insert what is new, insert `letters`.
    /// Returns the number of records inserted (the rest were duplicates).
    async fn transaction(
        &self,
        conn: &mut Conn,
        records: &[&Record],
        letters: &[Letter<'_>],
    ) -> Result<usize, tokio_postgres::Error> {
        let tx = conn.client.transaction().await?;
        let mut inserted = 0;
        if !records.is_empty() {
            let sink = tx.copy_in(&conn.copy).await?;
            let writer = BinaryCopyInWriter::new(sink, &COLUMN_TYPES);
            pin_mut!(writer);
            let (mut metrics, mut tags) = (Vec::with_capacity(256), Vec::with_capacity(64));
            for r in records {
                metrics.clear();
                tags.clear();
                write_metrics_json(&r.metrics, &mut metrics);
                write_tags_json(&r.tags, &mut tags);
                let seq = r.seq.map(|s| s as i64);
                let raw = (!r.raw.is_empty()).then_some(&r.raw[..]);
                writer
                    .as_mut()
                    .write(&[
                        &r.device_id,
                        &seq,
                        &r.device_ts_ms.map(Timestamp),
                        &Timestamp(r.received_ts_ms),
                        &protocol_name(r.protocol()),
                        &r.source,
                        &Jsonb(&metrics),
                        &Jsonb(&tags),
                        &raw,
                    ])
                    .await?;
            }
            writer.finish().await?;
            inserted = tx.execute(&conn.insert, &[]).await? as usize;
        }
        if !letters.is_empty() {
            let statement = tx.prepare(&self.sql.dead_letter).await?;
            for l in letters {
                tx.execute(
                    &statement,
                    &[&Timestamp(l.received_ts_ms), &l.device_id, &l.protocol, &l.source, &l.error, &l.raw],
                )
                .await?;
            }
        }
        tx.commit().await?;
        Ok(inserted)
    }
}

async fn log_end<F: std::future::Future<Output = Result<(), tokio_postgres::Error>>>(connection: F) {
    if let Err(error) = connection.await {
        tracing::debug!(%error, "postgres connection ended");
    }
}

fn out_of_range(r: &Record) -> Option<String> {
    let ts = r.device_ts_ms?;
    (!(PG_MIN_MS..PG_MAX_MS).contains(&ts))
        .then(|| format!("device timestamp {ts} ms is outside PostgreSQL's timestamptz range"))
}

fn record_letter(r: &Record, error: String) -> Letter<'_> {
    Letter {
        received_ts_ms: r.received_ts_ms,
        device_id: &r.device_id,
        protocol: protocol_name(r.protocol()),
        source: &r.source,
        error,
        raw: &r.raw,
    }
}

fn fabric_letter(d: &DeadLetter) -> Letter<'_> {
    Letter {
        received_ts_ms: d.received_ts_ms,
        device_id: &d.device_id,
        protocol: protocol_name(d.protocol),
        source: &d.source,
        error: d.error.clone(),
        raw: &d.raw,
    }
}

/// Errors about the rows themselves (SQLSTATE class 22 data exception, 23 integrity
/// constraint, 54 program limit such as a row too large): retrying cannot help; bisect.
fn is_data_error(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        let code = db.code().code();
        code.starts_with("22") || code.starts_with("23") || code.starts_with("54")
    })
}

fn database_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

fn retriable(what: &str, e: &tokio_postgres::Error) -> SinkError {
    SinkError::Retriable(format!("postgres: {what}: {}", database_error(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names() {
        assert!(check_table_name("telemetry").is_ok());
        assert!(check_table_name("iot.readings_2").is_ok());
        for bad in ["", "1abc", "a-b", "a.b.c", "a\"b", &"x".repeat(64)] {
            assert!(check_table_name(bad).is_err(), "{bad}");
        }
        assert_eq!(quoted("iot.readings"), "\"iot\".\"readings\"");
    }

    #[test]
    fn binary_encodings() {
        let mut out = BytesMut::new();
        Timestamp(946_684_801_000).to_sql(&Type::TIMESTAMPTZ, &mut out).unwrap();
        assert_eq!(&out[..], &1_000_000i64.to_be_bytes());
        out.clear();
        Jsonb(b"{}").to_sql(&Type::JSONB, &mut out).unwrap();
        assert_eq!(&out[..], b"\x01{}");
        assert!(Timestamp(i64::MAX).to_sql(&Type::TIMESTAMPTZ, &mut out).is_err());
    }

    #[test]
    fn timestamps_outside_postgres_range_are_refused_before_writing() {
        let mut r = Record { device_ts_ms: Some(0), ..Record::default() };
        assert!(out_of_range(&r).is_none());
        r.device_ts_ms = Some(PG_MAX_MS);
        assert!(out_of_range(&r).is_some());
        r.device_ts_ms = None;
        assert!(out_of_range(&r).is_none());
    }
}
