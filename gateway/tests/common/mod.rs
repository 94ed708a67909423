//! Shared helpers for the integration tests: a whole gateway on port 0 with a temporary data
//! directory, SQLite read-back, and packet builders for the raw MQTT client in [`raw_mqtt`];
//! real `weir` processes in [`process`].

#![allow(dead_code)]

pub mod kafka;
pub mod pki;
pub mod postgres;
pub mod process;
pub mod raw_mqtt;

// Re-exported for `use common::*`; test binaries without a raw client would warn.
#[allow(unused_imports)]
pub use raw_mqtt::RawClient;

use std::path::{Path, PathBuf};
use std::time::Duration;

use weir::config::Config;
use weir::Gateway;
use weir_protocols::mqtt::{Connect, Packet, Publish, QoS};

pub struct TestGateway {
    pub gateway: Gateway,
    pub dir: tempfile::TempDir,
}

impl TestGateway {
    /// Starts a gateway from TOML (listeners and ops on port 0 unless the text says otherwise).
    pub async fn start(extra_toml: &str) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), extra_toml).await
    }

    /// Starts a gateway on an existing data directory, as after a restart.
    pub async fn start_in(dir: tempfile::TempDir, extra_toml: &str) -> Self {
        let text = format!(
            "data_dir = {:?}\n[ops]\nlisten = \"127.0.0.1:0\"\n{extra_toml}",
            dir.path().display().to_string()
        );
        let mut config = Config::parse(&text, "test.toml").unwrap();
        if !extra_toml.contains("[[listeners]]") {
            if let weir::config::ListenerConfig::Mqtt(m) = &mut config.listeners[0] {
                m.listen = "127.0.0.1:0".parse().unwrap();
            }
        }
        let gateway = weir::start(config).await.unwrap();
        Self { gateway, dir }
    }

    pub fn mqtt_addr(&self) -> std::net::SocketAddr {
        self.gateway.listener_addrs()[0]
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("telemetry.db")
    }

    pub fn metric(&self, name: &str) -> u64 {
        metric_value(&self.gateway.metrics().encode(), name)
    }
}

/// Sum of every sample of `name` (all label sets) in a Prometheus text exposition.
pub fn metric_value(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ' | b'{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Rows of `(device_id, seq)` in the telemetry table, ordered.
pub fn rows(db: &Path) -> Vec<(String, i64)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn.prepare("SELECT device_id, seq FROM telemetry ORDER BY device_id, seq").unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect()
}

pub fn count(db: &Path, sql: &str) -> i64 {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// Polls `check` until it is true or `within` passes; returns the last result.
pub async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn connect_packet(client_id: &str) -> Packet {
    Packet::Connect(Connect {
        protocol_level: 4,
        clean_session: true,
        keep_alive_secs: 60,
        client_id: client_id.into(),
        will: None,
        username: None,
        password: None,
    })
}

pub fn publish(qos: QoS, pkid: u16, topic: &str, payload: String) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        pkid: if qos == QoS::AtMostOnce { 0 } else { pkid },
        payload: payload.into(),
    })
}

/// A JSON reading for `device` with sequence number `seq`.
pub fn reading(device: &str, seq: u64) -> String {
    format!(r#"{{"device_id":"{device}","seq":{seq},"metrics":{{"temp":21.5}}}}"#)
}

/// Holds SQLite's write lock from another connection, as another process could: the sink
/// cannot commit until it is released.
pub struct WriteLock(rusqlite::Connection);

impl WriteLock {
    pub fn take(db: &Path) -> Self {
        let conn = rusqlite::Connection::open(db).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        Self(conn)
    }

    pub fn release(self) {
        self.0.execute_batch("COMMIT").unwrap();
    }
}
