//! The disk buffer in a whole gateway: `ack = "buffered"` devices are acked after the fsync
//! while the sink is stalled and their records reach the sink once it returns; `committed`
//! devices still wait for the sink; a restart replays what the sink had not committed; a full
//! buffer holds devices back and loses nothing.

mod common;

use std::time::Duration;

use common::*;
use weir_protocols::mqtt::{Packet, QoS};

fn config(ack: &str, buffer: &str) -> String {
    config_with(ack, "", buffer)
}

fn config_with(ack: &str, listener: &str, buffer: &str) -> String {
    format!(
        "[[listeners]]\nprotocol = \"mqtt\"\nlisten = \"127.0.0.1:0\"\nack = \"{ack}\"\nmax_packet_bytes = 1024\n{listener}\n\
         [fabric]\nlinger_ms = 2\n[buffer]\nkind = \"disk\"\nsegment_bytes = 70000\n{buffer}\n\
         [shutdown]\ngrace_ms = 1000\n"
    )
}

/// Publishes QoS 1 readings `seqs` of `device` and returns how many PUBACKs arrived in `wait`.
async fn publish_all(
    client: &mut RawClient,
    device: &str,
    seqs: std::ops::Range<u64>,
    wait: Duration,
) -> usize {
    let n = seqs.end - seqs.start;
    for seq in seqs {
        let pkid = (seq % 60_000 + 1) as u16;
        client.send(&publish(QoS::AtLeastOnce, pkid, "t", reading(device, seq))).await;
    }
    pubacks(client, n as usize, wait).await
}

/// Reads up to `n` PUBACKs, waiting at most `wait` for each.
async fn pubacks(client: &mut RawClient, n: usize, wait: Duration) -> usize {
    let mut acked = 0;
    while acked < n {
        match client.recv_within(wait).await {
            Ok(Some(Packet::PubAck(_))) => acked += 1,
            other => {
                assert!(matches!(other, Err(())), "unexpected {other:?}");
                break;
            }
        }
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_acks_follow_the_fsync_while_the_sink_is_stalled() {
    for fsync in ["fsync = \"batch\"", "fsync = \"interval\"\nfsync_interval_ms = 50"] {
        let gw = TestGateway::start(&config("buffered", &format!("max_bytes = 1048576\n{fsync}"))).await;
        let lock = WriteLock::take(&gw.db_path());
        let mut device = RawClient::connect(gw.mqtt_addr(), "buf-dev").await;
        let acked = publish_all(&mut device, "buf-dev", 1..51, Duration::from_secs(10)).await;
        assert_eq!(acked, 50, "{fsync}: every message acked from the buffer while the sink is stalled");
        assert_eq!(count(&gw.db_path(), "SELECT count(*) FROM telemetry"), 0, "nothing reached the sink yet");
        assert!(
            eventually(Duration::from_secs(5), || gw.metric("weir_buffer_unacked_records") == 50).await,
            "{fsync}: the backlog is the 50 records ({})",
            gw.metric("weir_buffer_unacked_records")
        );
        lock.release();
        assert!(
            eventually(Duration::from_secs(15), || count(&gw.db_path(), "SELECT count(*) FROM telemetry")
                == 50)
            .await,
            "{fsync}: the backlog drains into the sink"
        );
        assert!(eventually(Duration::from_secs(5), || gw.metric("weir_buffer_unacked_records") == 0).await);
        assert_eq!(gw.metric("weir_buffer_appended_records_total"), 50);
        gw.gateway.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_acks_still_wait_for_the_sink_with_a_buffer() {
    let gw = TestGateway::start(&config("committed", "max_bytes = 1048576")).await;
    let lock = WriteLock::take(&gw.db_path());
    let mut device = RawClient::connect(gw.mqtt_addr(), "com-dev").await;
    let acked = publish_all(&mut device, "com-dev", 1..21, Duration::from_secs(2)).await;
    assert_eq!(acked, 0, "no PUBACK before the sink commits");
    assert!(
        eventually(Duration::from_secs(5), || gw.metric("weir_buffer_appended_records_total") == 20).await
    );
    lock.release();
    assert_eq!(pubacks(&mut device, 20, Duration::from_secs(15)).await, 20);
    assert_eq!(count(&gw.db_path(), "SELECT count(*) FROM telemetry"), 20);
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_replays_what_the_sink_had_not_committed() {
    let cfg = config("buffered", "max_bytes = 1048576");
    let gw = TestGateway::start(&cfg).await;
    let lock = WriteLock::take(&gw.db_path());
    let mut device = RawClient::connect(gw.mqtt_addr(), "replay-dev").await;
    assert_eq!(publish_all(&mut device, "replay-dev", 1..31, Duration::from_secs(10)).await, 30);
    drop(device);
    // The sink cannot commit: shutdown gives up on it after the grace period (1 s).
    let db = gw.db_path();
    let gw = {
        let dir = gw.dir;
        let report = gw.gateway.shutdown().await;
        assert!(!report.clean, "the stalled sink could not finish");
        lock.release();
        TestGateway::start_in(dir, &cfg).await
    };
    assert_eq!(gw.metric("weir_buffer_replayed_records_total"), 30);
    assert!(
        eventually(Duration::from_secs(15), || count(&db, "SELECT count(*) FROM telemetry") == 30).await,
        "every acked record reaches the sink after the restart"
    );
    // New records follow the replayed ones.
    let mut device = RawClient::connect(gw.mqtt_addr(), "replay-dev").await;
    assert_eq!(publish_all(&mut device, "replay-dev", 31..41, Duration::from_secs(10)).await, 10);
    assert!(eventually(Duration::from_secs(15), || count(&db, "SELECT count(*) FROM telemetry") == 40).await);
    assert!(eventually(Duration::from_secs(5), || gw.metric("weir_buffer_unacked_records") == 0).await);
    gw.gateway.shutdown().await;
    // Everything was committed and acknowledged: nothing to replay now.
    let gw = TestGateway::start_in(tempfile::tempdir().unwrap(), &cfg).await;
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_holds_devices_back_and_loses_nothing() {
    const SENT: u64 = 2_000;
    // Raw payloads kept: about 150 bytes an entry, so some 1,000 fill the log.
    let gw = TestGateway::start(&config_with("buffered", "keep_raw = true", "max_bytes = 140000")).await;
    let lock = WriteLock::take(&gw.db_path());
    let mut device = RawClient::connect(gw.mqtt_addr(), "full-dev").await;
    let acked = publish_all(&mut device, "full-dev", 0..SENT, Duration::from_secs(3)).await as u64;
    println!("acked while the sink was stalled and the buffer full: {acked} of {SENT}");
    assert!(acked > 0 && acked < SENT, "{acked} acked: some fit the 140 kB buffer, the rest wait");
    assert!(gw.metric("weir_buffer_full_total") > 0, "the buffer reported it was full");
    assert_eq!(gw.metric("weir_buffer_waiting"), 1);
    lock.release();
    let rest = pubacks(&mut device, (SENT - acked) as usize, Duration::from_secs(20)).await as u64;
    assert_eq!(acked + rest, SENT, "every message acked once the sink drained the buffer");
    assert!(
        eventually(Duration::from_secs(15), || count(&gw.db_path(), "SELECT count(*) FROM telemetry")
            == SENT as i64)
        .await
    );
    assert_eq!(gw.metric("weir_records_dropped_total"), 0);
    gw.gateway.shutdown().await;
}

/// With the sink stalled, records in the log hold no room in the fabric: a device sends ten
/// times the fabric's bound and is acked for all of it, from the buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sink_fills_the_disk_not_the_fabric() {
    let cfg = config("buffered", "max_bytes = 1048576")
        .replace("[fabric]\n", "[fabric]\nshards = 1\nmax_records = 100\nbatch_max_records = 50\n");
    let gw = TestGateway::start(&cfg).await;
    let lock = WriteLock::take(&gw.db_path());
    let mut device = RawClient::connect(gw.mqtt_addr(), "outage-dev").await;
    for round in 0..10u64 {
        let acked =
            publish_all(&mut device, "outage-dev", round * 100..round * 100 + 100, Duration::from_secs(10))
                .await;
        assert_eq!(acked, 100, "round {round}: acked from the buffer while the sink is stalled");
    }
    assert!(eventually(Duration::from_secs(5), || gw.metric("weir_fabric_shard_records") == 0).await);
    assert!(
        eventually(Duration::from_secs(5), || gw.metric("weir_buffer_unacked_records") == 1000).await,
        "the backlog is on disk: {}",
        gw.metric("weir_buffer_unacked_records")
    );
    lock.release();
    assert!(
        eventually(Duration::from_secs(20), || count(&gw.db_path(), "SELECT count(*) FROM telemetry")
            == 1000)
        .await
    );
    gw.gateway.shutdown().await;
}
