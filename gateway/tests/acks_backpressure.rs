//! An ack means safe, and a full fabric pushes back: exact counts against a held SQLite sink.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use weir_protocols::mqtt::{Packet, QoS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_puback_before_the_commit() {
    let gw = TestGateway::start("[fabric]\nlinger_ms = 1\n").await;
    let db = gw.db_path();
    let lock = WriteLock::take(&db);

    let mut client = RawClient::connect(gw.mqtt_addr(), "safe-dev").await;
    for pkid in 1..=10u16 {
        client
            .send(&publish(QoS::AtLeastOnce, pkid, "devices/safe-dev/t", reading("safe-dev", pkid.into())))
            .await;
    }
    client.send(&publish(QoS::ExactlyOnce, 11, "devices/safe-dev/t", reading("safe-dev", 11))).await;
    // The sink is retrying against the lock: nothing is committed, so nothing is acknowledged.
    assert_eq!(
        client.recv_within(Duration::from_secs(1)).await,
        Err(()),
        "no ack while the sink cannot commit"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM telemetry"), 0);
    assert!(gw.metric("weir_sink_errors_total") > 0, "the sink met the lock and is retrying");

    lock.release();
    let mut acks = Vec::new();
    for _ in 0..11 {
        acks.push(client.recv_within(Duration::from_secs(10)).await.expect("ack after release"));
        // Every acknowledged message is in the table at the moment its ack arrives.
        let stored = count(&db, "SELECT count(*) FROM telemetry") as usize;
        assert!(stored >= acks.len(), "{} acks but {stored} rows", acks.len());
    }
    let mut expected: Vec<_> = (1..=10).map(|p| Some(Packet::PubAck(p))).collect();
    expected.push(Some(Packet::PubRec(11)));
    assert_eq!(acks, expected, "acks in publish order");
    client.send(&Packet::PubRel(11)).await;
    assert_eq!(client.recv().await, Some(Packet::PubComp(11)));
    assert_eq!(rows(&db).len(), 11);
    gw.gateway.shutdown().await;
}

fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: usize = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_fabric_blocks_at_exactly_its_bound() {
    const BOUND: u64 = 300;
    const SENT: u64 = 80_000;
    let gw = TestGateway::start(&format!(
        "[fabric]\nshards = 1\nmax_records = {BOUND}\nbatch_max_records = 100\nlinger_ms = 1\n\
         [sink]\nkind = \"sqlite\"\nsynchronous = \"normal\"\n"
    ))
    .await;
    let db = gw.db_path();
    let lock = WriteLock::take(&db);
    let rss_before = rss_bytes();

    let mut client = RawClient::connect(gw.mqtt_addr(), "bp-dev").await;
    let written = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn({
        let written = Arc::clone(&written);
        async move {
            for seq in 0..SENT {
                // ~300 bytes a message: 24 MB in all, far more than the kernel's socket buffers.
                let payload = format!(r#"{{"device_id":"bp-dev","seq":{seq},"pad":"{}"}}"#, "x".repeat(240));
                client.send(&publish(QoS::AtMostOnce, 0, "devices/bp-dev/t", payload)).await;
                written.fetch_add(1, Ordering::Relaxed);
            }
            client
        }
    });

    assert!(
        eventually(Duration::from_secs(10), || gw.metric("weir_records_enqueued_total") == BOUND).await,
        "fabric fills to its bound"
    );
    // The device keeps writing until the kernel's socket buffers are full, then blocks.
    let mut progress = written.load(Ordering::Relaxed);
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = written.load(Ordering::Relaxed);
        if now == progress {
            break;
        }
        progress = now;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Exactly the bound is inside weir; the next message waits, and the socket is not read.
    assert_eq!(gw.metric("weir_records_enqueued_total"), BOUND);
    assert_eq!(gw.metric("weir_fabric_shard_records"), BOUND);
    assert_eq!(gw.metric("weir_messages_received_total"), BOUND + 1, "one decoded message awaits room");
    assert_eq!(gw.metric("weir_records_dropped_total"), 0);
    assert_eq!(written.load(Ordering::Relaxed), progress, "the device's writes are blocked");
    assert!(!writer.is_finished());
    assert!((progress as u64) < SENT, "kernel buffers hold only part of the stream");
    let grown = rss_bytes().saturating_sub(rss_before);
    assert!(grown < 12 << 20, "memory grew by {grown} bytes while blocked");

    lock.release();
    let _client =
        tokio::time::timeout(Duration::from_secs(60), writer).await.expect("writer unblocks").unwrap();
    assert!(
        eventually(Duration::from_secs(60), || gw.metric("weir_records_committed_total") == SENT).await,
        "committed {}",
        gw.metric("weir_records_committed_total")
    );
    assert_eq!(count(&db, "SELECT count(*) FROM telemetry"), SENT as i64, "nothing dropped under block");
    assert_eq!(gw.metric("weir_records_dropped_total"), 0);
    assert_eq!(gw.metric("weir_fabric_shard_records"), 0);
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_newest_counts_each_drop() {
    let gw = TestGateway::start(
        "[fabric]\nshards = 1\nmax_records = 5\nbatch_max_records = 5\nlinger_ms = 1\nwhen_full = \"drop_newest\"\n",
    )
    .await;
    let db = gw.db_path();
    let lock = WriteLock::take(&db);
    let mut client = RawClient::connect(gw.mqtt_addr(), "drop-dev").await;
    for pkid in 1..=8u16 {
        client.send(&publish(QoS::AtLeastOnce, pkid, "t", reading("drop-dev", pkid.into()))).await;
    }
    assert!(eventually(Duration::from_secs(5), || gw.metric("weir_records_dropped_total") == 3).await);
    assert_eq!(gw.metric("weir_records_enqueued_total"), 5);
    lock.release();
    for pkid in 1..=8u16 {
        // MQTT 3.1.1 has no error PUBACK; a dropped message is acked (it was counted) so the
        // device does not resend into a full fabric forever.
        assert_eq!(client.recv_within(Duration::from_secs(10)).await, Ok(Some(Packet::PubAck(pkid))));
    }
    assert_eq!(rows(&db).iter().map(|r| r.1).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_held_back_does_not_count_against_keepalive() {
    let gw =
        TestGateway::start("[fabric]\nshards = 1\nmax_records = 5\nbatch_max_records = 5\nlinger_ms = 1\n")
            .await;
    let db = gw.db_path();
    let lock = WriteLock::take(&db);
    let mut client = RawClient::open(gw.mqtt_addr()).await;
    let Packet::Connect(mut connect) = connect_packet("held-dev") else { unreachable!() };
    connect.keep_alive_secs = 1;
    client.send(&Packet::Connect(connect)).await;
    assert!(matches!(client.recv().await, Some(Packet::ConnAck(_))));
    for seq in 0..10 {
        client.send(&publish(QoS::AtMostOnce, 0, "t", reading("held-dev", seq))).await;
    }
    // Held back for twice the 1.5 s keepalive allowance: weir's doing, not the device's.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(gw.metric("weir_records_enqueued_total"), 5);
    lock.release();
    client.send(&publish(QoS::AtLeastOnce, 1, "t", reading("held-dev", 10))).await;
    assert_eq!(client.recv_within(Duration::from_secs(10)).await, Ok(Some(Packet::PubAck(1))));
    assert_eq!(rows(&db).len(), 11);
    assert_eq!(gw.metric("weir_protocol_errors_total"), 0);
    gw.gateway.shutdown().await;
}
