//! The PostgreSQL sink against the real server from `deploy/local/postgres.sh` (started by the
//! test command): values, dedupe on replay, per-row isolation of rows the database refuses, and
//! a restart of the database in the middle of a stream.

mod common;

use std::time::Duration;

use common::postgres::*;
use common::*;
use weir_protocols::mqtt::{Packet, QoS};

/// The restart test stops the shared server: it runs alone, the others side by side.
static SERVER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn postgres_sink(table: &str, extra: &str) -> String {
    format!(
        "[fabric]\nlinger_ms = 20\n[sink]\nkind = \"postgres\"\nurl = \"{}\"\ntable = \"{table}\"\n\
         dead_letter_table = \"{table}_dl\"\n{extra}",
        url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_arrive_with_their_values_and_replays_are_stored_once() {
    let _server = SERVER.read().await;
    let table = unique_table("weir_it");
    let gw = TestGateway::start(&postgres_sink(&table, "")).await;
    let mut device = RawClient::connect(gw.mqtt_addr(), "pg-dev").await;
    let payload = r#"{"seq":1,"ts":"2026-11-26T12:00:00.250Z","metrics":{"temp":21.5,"on":true,"mode":"eco"},"tags":{"site":"north"}}"#;
    device.send(&publish(QoS::AtLeastOnce, 1, "devices/pg-dev/telemetry", payload.into())).await;
    assert_eq!(device.recv_within(Duration::from_secs(30)).await, Ok(Some(Packet::PubAck(1))));
    // The same reading twice more (a device resending after a lost PUBACK).
    for pkid in [2, 3] {
        device.send(&publish(QoS::AtLeastOnce, pkid, "devices/pg-dev/telemetry", payload.into())).await;
        assert_eq!(device.recv_within(Duration::from_secs(30)).await, Ok(Some(Packet::PubAck(pkid))));
    }

    let db = connect().await;
    let rows = db
        .query(
            &format!(
                "SELECT device_id, seq, extract(epoch from device_ts)::float8, received_ts > now() - interval '1 minute', \
                 protocol, source, (metrics->>'temp')::float8, metrics->>'on', metrics->>'mode', tags->>'site' FROM {table}"
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "a replay is stored once");
    let r = &rows[0];
    assert_eq!(r.get::<_, String>(0), "pg-dev");
    assert_eq!(r.get::<_, i64>(1), 1);
    assert_eq!(r.get::<_, f64>(2), 1_795_694_400.25);
    assert!(r.get::<_, bool>(3));
    assert_eq!(r.get::<_, String>(4), "mqtt");
    assert_eq!(r.get::<_, String>(5), "devices/pg-dev/telemetry");
    assert_eq!(r.get::<_, f64>(6), 21.5);
    assert_eq!(r.get::<_, String>(7), "true");
    assert_eq!(r.get::<_, String>(8), "eco");
    assert_eq!(r.get::<_, String>(9), "north");
    assert_eq!(gw.metric("weir_records_duplicate_total"), 2);
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_database_refuses_is_dead_lettered_and_the_rest_commit() {
    let _server = SERVER.read().await;
    let table = unique_table("weir_bad");
    // A long linger puts all the messages below in one batch.
    let gw =
        TestGateway::start(&postgres_sink(&table, "").replace("linger_ms = 20", "linger_ms = 300")).await;
    let mut device = RawClient::connect(gw.mqtt_addr(), "bad-dev").await;
    for seq in 1..=20u16 {
        // jsonb refuses the NUL character: the database, not weir, rejects row 13.
        let note = if seq == 13 { r#""bad\u0000text""# } else { r#""fine""# };
        let payload = format!(r#"{{"seq":{seq},"temp":{seq},"note":{note}}}"#);
        device.send(&publish(QoS::AtLeastOnce, seq, "devices/bad-dev/t", payload)).await;
    }
    for pkid in 1..=20u16 {
        // The refused row is dead-lettered, a durable outcome: every message is acked.
        assert_eq!(device.recv_within(Duration::from_secs(30)).await, Ok(Some(Packet::PubAck(pkid))));
    }
    assert_eq!(gw.metric("weir_sink_batch_records_count"), 1, "one batch");
    let db = connect().await;
    let seqs: Vec<i64> = db
        .query(&format!("SELECT seq FROM {table} ORDER BY seq"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let expected: Vec<i64> = (1..=20).filter(|s| *s != 13).collect();
    assert_eq!(seqs, expected);
    let letters = db.query(&format!("SELECT device_id, source, error FROM {table}_dl"), &[]).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].get::<_, String>(0), "bad-dev");
    assert_eq!(letters[0].get::<_, String>(1), "devices/bad-dev/t");
    let error: String = letters[0].get(2);
    assert!(error.contains("SQLSTATE 22"), "{error}");
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_mid_stream_loses_no_acked_record() {
    let _server = SERVER.write().await;
    let table = unique_table("weir_restart");
    let gw = TestGateway::start(&postgres_sink(&table, "")).await;
    let addr = gw.mqtt_addr();
    let mut params = weir_load::flood::FloodParams::new(addr.ip().to_string(), addr.port());
    params.connections = 20;
    params.qos = 1;
    params.duration_secs = 20;
    params.rate_per_conn = 100;
    params.max_inflight = 50;
    params.drain_timeout_secs = 60;
    params.client_prefix = Some(unique_table("pgr").replace('_', "-"));
    params.label = "weir-postgres-restart".into();
    let flood = tokio::spawn(weir_load::flood::run(params));

    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = gw.metric("weir_records_committed_total");
    assert!(before > 1_000, "the stream is flowing ({before} committed)");
    tokio::task::spawn_blocking(|| postgres_sh(&["stop"])).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let during = gw.metric("weir_records_committed_total");
    assert_eq!(gw.metric("weir_sink_connected"), 0, "readiness reports the database down");
    tokio::task::spawn_blocking(|| postgres_sh(&["start"])).await.unwrap();

    let report = flood.await.unwrap().expect("flood ran");
    assert_eq!(report.errors, 0, "devices saw backpressure, not errors");
    assert!(report.acked > during, "acks resumed after the restart");
    let db = connect().await;
    let mut found = weir_load::verify::Found::default();
    for row in db.query(&format!("SELECT device_id, seq FROM {table}"), &[]).await.unwrap() {
        found.record(row.get::<_, &str>(0), row.get::<_, Option<i64>>(1).map(|s| s as u64));
    }
    let verdict = weir_load::verify::verdict(&report.devices, &found);
    println!("verifier after a PostgreSQL restart: {}", serde_json::to_string(&verdict.totals).unwrap());
    assert_eq!(verdict.totals.lost, 0, "acked records lost");
    assert_eq!(verdict.totals.duplicates, 0);
    gw.gateway.shutdown().await;
}

fn postgres_ca() -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/local/postgres.sh");
    let out = std::process::Command::new("bash").arg(script).arg("ca").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_when_the_url_asks_for_it_verified_against_the_ca() {
    let _server = SERVER.read().await;
    let table = unique_table("weir_tls");
    let tls_url = format!("{}?sslmode=require", url());
    let config =
        postgres_sink(&table, &format!("tls_ca_file = {:?}\n", postgres_ca())).replace(&url(), &tls_url);
    let gw = TestGateway::start(&config).await;
    let mut device = RawClient::connect(gw.mqtt_addr(), "tls-dev").await;
    device.send(&publish(QoS::AtLeastOnce, 1, "t", reading("tls-dev", 1))).await;
    assert_eq!(device.recv_within(Duration::from_secs(30)).await, Ok(Some(Packet::PubAck(1))));
    let db = connect().await;
    let encrypted: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'weir' AND s.ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(encrypted >= 1, "weir's connection is encrypted");
    gw.gateway.shutdown().await;

    // A CA that did not sign the server's certificate: no connection, no ack, not ready.
    let table = unique_table("weir_tls_bad");
    let config = postgres_sink(&table, "tls_ca_file = \"/etc/ssl/certs/ca-certificates.crt\"\n")
        .replace(&url(), &tls_url);
    let gw = TestGateway::start(&config).await;
    let mut device = RawClient::connect(gw.mqtt_addr(), "tls-dev").await;
    device.send(&publish(QoS::AtLeastOnce, 1, "t", reading("tls-dev", 2))).await;
    assert_eq!(device.recv_within(Duration::from_secs(3)).await, Err(()), "no ack without a verified server");
    assert_eq!(gw.metric("weir_sink_connected"), 0);
    assert!(gw.metric("weir_sink_errors_total") > 0);
    gw.gateway.shutdown().await;
}
