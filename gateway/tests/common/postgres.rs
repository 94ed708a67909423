//! PostgreSQL helpers for the integration tests: the real local server from
//! `deploy/local/postgres.sh`, unique tables, and queries.

use std::time::{SystemTime, UNIX_EPOCH};

use tokio_postgres::{Client, NoTls};

/// The database the tests use: `WEIR_TEST_POSTGRES`, else the one `deploy/local/postgres.sh` starts.
pub fn url() -> String {
    std::env::var("WEIR_TEST_POSTGRES").unwrap_or_else(|_| "postgres://weir@127.0.0.1:5433/weir".into())
}

/// A table name no other test run uses.
pub fn unique_table(prefix: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("{prefix}_{}_{nanos}", std::process::id())
}

pub async fn connect() -> Client {
    let (client, connection) = tokio_postgres::connect(&url(), NoTls).await.expect("PostgreSQL is running");
    tokio::spawn(connection);
    client
}

/// Runs `deploy/local/postgres.sh ARGS` and fails the test if it fails.
pub fn postgres_sh(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/local/postgres.sh");
    let status = std::process::Command::new("bash").arg(script).args(args).status().unwrap();
    assert!(status.success(), "deploy/local/postgres.sh {args:?} failed: {status}");
}
