//! Shared helpers for the integration tests: a whole gateway on port 0 with a temporary data
//! directory, a raw MQTT client built on weir's own codec, and SQLite read-back; real `weir`
//! processes in [`process`].

#![allow(dead_code)]

pub mod kafka;
pub mod pki;
pub mod postgres;
pub mod process;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir::config::Config;
use weir::Gateway;
use weir_protocols::mqtt::{decode, encode, Connect, Packet, Publish, QoS};

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

/// A deliberately simple MQTT client over weir's codec, for exact control of the bytes sent.
pub struct RawClient {
    pub stream: TcpStream,
    buf: BytesMut,
}

impl RawClient {
    pub async fn open(addr: std::net::SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Self { stream, buf: BytesMut::new() }
    }

    /// Opens a connection and completes CONNECT/CONNACK.
    pub async fn connect(addr: std::net::SocketAddr, client_id: &str) -> Self {
        let mut client = Self::open(addr).await;
        client.send(&connect_packet(client_id)).await;
        match client.recv().await {
            Some(Packet::ConnAck(ack)) => assert_eq!(ack.code as u8, 0, "CONNACK refused"),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        client
    }

    pub async fn send(&mut self, packet: &Packet) {
        let mut out = BytesMut::new();
        encode(packet, &mut out);
        self.stream.write_all(&out).await.unwrap();
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// The next packet from weir, or None when weir closed the connection.
    pub async fn recv(&mut self) -> Option<Packet> {
        loop {
            if let Some(packet) = decode(&mut self.buf, 1 << 20).expect("weir sent a malformed packet") {
                return Some(packet);
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// The next packet within `wait`, `Err(())` on timeout.
    pub async fn recv_within(&mut self, wait: Duration) -> Result<Option<Packet>, ()> {
        tokio::time::timeout(wait, self.recv()).await.map_err(|_| ())
    }

    /// True when weir closes the connection (EOF or reset) within `wait`, discarding packets.
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        tokio::time::timeout(wait, async { while self.recv().await.is_some() {} }).await.is_ok()
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
