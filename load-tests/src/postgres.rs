//! What weir-load shares about weir's PostgreSQL sink: the table it writes (DDL and columns),
//! the binary COPY encodings of its `timestamptz` and `jsonb` columns, and connecting.

use std::error::Error;

use anyhow::{bail, Context};
use bytes::{BufMut, BytesMut};
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use tokio_postgres::{Client, NoTls};

/// The local test server of `deploy/local/postgres.sh`.
pub const DEFAULT_URL: &str = "postgres://weir@127.0.0.1:5433/weir";

/// The staging table and columns weir's sink uses: the one copy in `weir-protocols`.
pub use weir_protocols::record_sql::{COLUMNS, STAGING_TABLE};

/// The binary COPY types of [`COLUMNS`].
pub const COLUMN_TYPES: [Type; 9] = [
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

/// Seconds from the Unix epoch to PostgreSQL's, 2000-01-01T00:00:00Z.
const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;

/// Checks that `table` is a plain lower-case identifier (`[a-z_][a-z0-9_]*`, at most 63 bytes),
/// the same whether PostgreSQL sees it quoted or not, so it can be written into SQL as is.
pub fn check_table_name(table: &str) -> anyhow::Result<()> {
    let mut bytes = table.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
    if !first_ok
        || table.len() > 63
        || !bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        bail!("table name {table:?}: use lower-case letters, digits and '_' (not first), at most 63");
    }
    Ok(())
}

/// The table weir's sink writes, with its `(device_id, device_ts)` index; `IF NOT EXISTS`
/// throughout. `table` must pass [`check_table_name`].
pub fn create_table_sql(table: &str) -> String {
    weir_protocols::record_sql::create_table_sql(table, &format!("{table}_device_ts"))
}

/// Connects without TLS and drives the connection on a task; its errors go to stderr.
pub async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) =
        tokio_postgres::connect(url, NoTls).await.with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            eprintln!("weir-load: PostgreSQL connection error: {error}");
        }
    });
    Ok(client)
}

/// Creates `table` as weir's sink would (see [`create_table_sql`]) unless it exists; with
/// `recreate`, drops it (and everything in it) first.
pub async fn create_table(client: &Client, table: &str, recreate: bool) -> anyhow::Result<()> {
    check_table_name(table)?;
    if recreate {
        client
            .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
            .await
            .with_context(|| format!("dropping {table}"))?;
    }
    client.batch_execute(&create_table_sql(table)).await.with_context(|| format!("creating {table}"))
}

/// A `timestamptz` value in PostgreSQL's binary format: microseconds since 2000-01-01T00:00Z,
/// big-endian `i64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamptz {
    /// Microseconds since PostgreSQL's epoch (2000-01-01T00:00:00Z).
    pub pg_micros: i64,
}

impl Timestamptz {
    /// The instant `ms` milliseconds after the Unix epoch.
    pub fn from_unix_millis(ms: i64) -> Self {
        Self { pg_micros: ms.saturating_sub(PG_EPOCH_UNIX_SECS * 1000).saturating_mul(1000) }
    }
}

impl ToSql for Timestamptz {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.put_i64(self.pg_micros);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ
    }

    to_sql_checked!();
}

/// A `jsonb` value in PostgreSQL's binary format: the version byte 1, then the JSON text. The
/// text is not checked here (the server parses it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Jsonb<'a>(pub &'a [u8]);

impl ToSql for Jsonb<'_> {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.reserve(1 + self.0.len());
        out.put_u8(1);
        out.put_slice(self.0);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }

    to_sql_checked!();
}

/// The metrics JSON weir's sinks write: the one shared copy in `weir-protocols`.
pub use weir_protocols::record_json::write_metrics_json;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use weir_proto::{metric_value::Kind, MetricValue};

    fn encode(value: &dyn ToSql, ty: &Type) -> Vec<u8> {
        let mut out = BytesMut::new();
        assert!(matches!(value.to_sql_checked(ty, &mut out).unwrap(), IsNull::No));
        out.to_vec()
    }

    #[test]
    fn timestamptz_is_big_endian_microseconds_since_2000() {
        // 2000-01-01T00:00:01Z
        let one_second = Timestamptz::from_unix_millis(946_684_801_000);
        assert_eq!(one_second.pg_micros, 1_000_000);
        assert_eq!(encode(&one_second, &Type::TIMESTAMPTZ), 1_000_000i64.to_be_bytes());
        assert_eq!(Timestamptz::from_unix_millis(946_684_800_000).pg_micros, 0);
        // Before 2000 is negative; 1970-01-01 is the offset itself.
        assert_eq!(Timestamptz::from_unix_millis(0).pg_micros, -946_684_800_000_000);
        // 2023-11-14T22:13:20.123Z
        assert_eq!(Timestamptz::from_unix_millis(1_700_000_000_123).pg_micros, 753_315_200_123_000);
    }

    #[test]
    fn jsonb_is_version_one_then_the_text() {
        let bytes = encode(&Jsonb(br#"{"temp":21.5}"#), &Type::JSONB);
        assert_eq!(bytes[0], 1);
        assert_eq!(&bytes[1..], br#"{"temp":21.5}"#);
        assert_eq!(encode(&Jsonb(b"{}"), &Type::JSONB), b"\x01{}");
    }

    #[test]
    fn wrappers_accept_only_their_types() {
        let mut out = BytesMut::new();
        assert!(Jsonb(b"{}").to_sql_checked(&Type::JSON, &mut out).is_err());
        assert!(Timestamptz::from_unix_millis(0).to_sql_checked(&Type::TIMESTAMP, &mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn metrics_json_is_the_sinks_object_in_name_order() {
        let metrics: BTreeMap<String, MetricValue> = [
            ("temp", Some(Kind::Number(21.5))),
            ("hum", Some(Kind::Number(40.1))),
            ("pad", Some(Kind::Text("x\"x".into()))),
            ("on", Some(Kind::Flag(true))),
            ("none", None),
        ]
        .into_iter()
        .map(|(name, kind)| (name.to_owned(), MetricValue { kind }))
        .collect();
        let mut out = Vec::new();
        write_metrics_json(&metrics, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"hum":40.1,"none":null,"on":true,"pad":"x\"x","temp":21.5}"#
        );
    }

    #[test]
    fn table_names_are_plain_lower_case_identifiers() {
        for ok in ["telemetry", "weir_bench", "_t1", &"a".repeat(63)] {
            check_table_name(ok).unwrap();
        }
        for bad in ["", "1t", "Telemetry", "t-1", "s.t", "t; drop table x", &"a".repeat(64), "tä"] {
            assert!(check_table_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ddl_names_the_table_and_its_index() {
        let sql = create_table_sql("weir_bench");
        assert!(sql.starts_with("CREATE TABLE IF NOT EXISTS weir_bench ("), "{sql}");
        assert!(sql.contains("UNIQUE (device_id, seq)"), "{sql}");
        assert!(sql.ends_with(
            "CREATE INDEX IF NOT EXISTS weir_bench_device_ts ON weir_bench (device_id, device_ts);"
        ));
    }
}
