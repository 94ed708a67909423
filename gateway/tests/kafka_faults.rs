//! The Kafka sink when the broker fails: stopped (no PUBACK until it returns, keepalives still
//! answered, memory bounded) and SIGKILLed in the middle of a 100-device QoS 1 stream (nothing
//! acked is lost). These stop the shared local broker, so they run one after the other.

mod common;

use std::time::Duration;

use common::kafka::*;
use common::*;
use tokio::sync::Mutex;
use weir_protocols::mqtt::{Packet, QoS};

/// The broker is shared: one disruptive test at a time.
static BROKER: Mutex<()> = Mutex::const_new(());

fn kafka_config(topic: &str, extra_fabric: &str) -> String {
    format!(
        "[fabric]\nlinger_ms = 2\n{extra_fabric}\n[sink]\nkind = \"kafka\"\nbrokers = \"{}\"\ntopic = \"{topic}\"\n\
         dead_letter_topic = \"{topic}-dl\"\ntopic_partitions = 4\n",
        brokers()
    )
}

async fn kafka(args: &'static [&'static str]) {
    tokio::task::spawn_blocking(move || kafka_sh(args)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_stopped_means_no_puback_until_it_returns() {
    let _broker = BROKER.lock().await;
    kafka(&["start"]).await;
    const BOUND: u64 = 400;
    let topic = unique_topic("weir-down");
    let gw = TestGateway::start(&kafka_config(
        &topic,
        &format!("shards = 1\nmax_records = {BOUND}\nbatch_max_records = 100"),
    ))
    .await;
    // Warm up: the topic exists and the producer is connected.
    let mut device = RawClient::connect(gw.mqtt_addr(), "down-dev").await;
    device.send(&publish(QoS::AtLeastOnce, 1, "t", reading("down-dev", 1))).await;
    assert_eq!(device.recv_within(Duration::from_secs(30)).await, Ok(Some(Packet::PubAck(1))));

    kafka(&["stop"]).await;
    for pkid in 2..=21u16 {
        device.send(&publish(QoS::AtLeastOnce, pkid, "t", reading("down-dev", pkid.into()))).await;
    }
    device.send(&Packet::PingReq).await;
    // Only the PINGRESP: no PUBACK while Kafka has not acknowledged anything.
    assert_eq!(device.recv_within(Duration::from_secs(5)).await, Ok(Some(Packet::PingResp)));
    assert_eq!(
        device.recv_within(Duration::from_secs(3)).await,
        Err(()),
        "no PUBACK while the broker is down"
    );

    // Another device floods at QoS 0: the fabric fills to its bound and no further.
    let mut flooder = RawClient::connect(gw.mqtt_addr(), "flood-dev").await;
    let flood = tokio::spawn(async move {
        for seq in 0..5_000u64 {
            flooder.send(&publish(QoS::AtMostOnce, 0, "t", reading("flood-dev", seq))).await;
        }
        flooder
    });
    assert!(
        eventually(Duration::from_secs(10), || gw.metric("weir_records_enqueued_total") == BOUND + 1).await,
        "fabric fills: {}",
        gw.metric("weir_records_enqueued_total")
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    // 1 warm-up record (committed, room returned) + exactly BOUND held now.
    assert_eq!(gw.metric("weir_records_enqueued_total"), BOUND + 1);
    assert_eq!(gw.metric("weir_fabric_shard_records"), BOUND);
    assert_eq!(gw.metric("weir_records_dropped_total"), 0);
    // The first device is idle, not blocked: keepalives are still answered.
    device.send(&Packet::PingReq).await;
    assert_eq!(device.recv_within(Duration::from_secs(5)).await, Ok(Some(Packet::PingResp)));
    assert_eq!(gw.metric("weir_sink_connected"), 0, "readiness reports the broker down");

    kafka(&["start"]).await;
    for pkid in 2..=21u16 {
        assert_eq!(device.recv_within(Duration::from_secs(90)).await, Ok(Some(Packet::PubAck(pkid))));
    }
    let _flooder =
        tokio::time::timeout(Duration::from_secs(90), flood).await.expect("flood unblocks").unwrap();
    assert!(
        eventually(Duration::from_secs(90), || gw.metric("weir_records_committed_total") == 21 + 5_000).await,
        "committed {}",
        gw.metric("weir_records_committed_total")
    );
    let t = topic.clone();
    let messages =
        tokio::task::spawn_blocking(move || read_topic(&t, 5_021, Duration::from_secs(60))).await.unwrap();
    assert_eq!(messages.len(), 5_021);
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_mid_stream_loses_no_acked_record() {
    let _broker = BROKER.lock().await;
    kafka(&["start"]).await;
    let topic = unique_topic("weir-kill");
    let gw = TestGateway::start(&kafka_config(&topic, "")).await;
    let addr = gw.mqtt_addr();
    let mut params = weir_load::flood::FloodParams::new(addr.ip().to_string(), addr.port());
    params.connections = 100;
    params.qos = 1;
    params.duration_secs = 45;
    params.rate_per_conn = 40;
    params.max_inflight = 100;
    params.drain_timeout_secs = 120;
    params.client_prefix = Some(unique_topic("kill"));
    params.label = "weir-kafka-kill".into();
    let flood = tokio::spawn(weir_load::flood::run(params));

    tokio::time::sleep(Duration::from_secs(8)).await;
    let committed_before = gw.metric("weir_records_committed_total");
    assert!(committed_before > 1_000, "the stream is flowing ({committed_before} committed)");
    // Records handed to the producer and not yet acknowledged (the most a retry can duplicate),
    // sampled for 200 ms up to the kill.
    let mut in_flight = 0;
    for _ in 0..40 {
        in_flight = in_flight.max(gw.metric("weir_sink_in_flight_records"));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    kafka(&["kill"]).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    kafka(&["start"]).await;

    let report = flood.await.unwrap().expect("flood ran");
    let t = topic.clone();
    let found = tokio::task::spawn_blocking(move || {
        weir_load::verify::kafka::consume_blocking(&brokers(), &t, Duration::from_secs(5))
    })
    .await
    .unwrap()
    .expect("topic read back");
    let verdict = weir_load::verify::verdict(&report.devices, &found);
    println!("verifier after a 30 s broker kill: {}", serde_json::to_string(&verdict.totals).unwrap());
    println!(
        "records in flight at the kill: {in_flight}; flood: sent {} acked {} errors {}",
        report.sent, report.acked, report.errors
    );
    assert_eq!(verdict.totals.lost, 0, "acked records lost");
    assert!(
        verdict.totals.duplicates <= in_flight,
        "{} duplicates > {in_flight} in flight",
        verdict.totals.duplicates
    );
    assert!(report.acked > committed_before, "acks resumed after the broker returned");
    assert_eq!(report.errors, 0, "no device connection failed");
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_producer_queue_is_backpressure_not_an_error() {
    let _broker = BROKER.lock().await;
    kafka(&["start"]).await;
    let topic = unique_topic("weir-queue");
    let config = kafka_config(&topic, "batch_max_records = 10").replace(
        "topic_partitions = 4\n",
        "topic_partitions = 4\nqueue_max_messages = 20\nmax_in_flight_batches = 4\n",
    );
    let gw = TestGateway::start(&config).await;
    let mut device = RawClient::connect(gw.mqtt_addr(), "queue-dev").await;
    device.send(&publish(QoS::AtLeastOnce, 1, "t", reading("queue-dev", 1))).await;
    assert_eq!(device.recv_within(Duration::from_secs(30)).await, Ok(Some(Packet::PubAck(1))));

    kafka(&["stop"]).await;
    // 200 messages into a 20-message producer queue while the broker is away.
    for seq in 2..=201u16 {
        device.send(&publish(QoS::AtLeastOnce, seq, "t", reading("queue-dev", seq.into()))).await;
    }
    assert!(
        eventually(Duration::from_secs(10), || labelled(&gw, "weir_kafka_errors_total", "queue_full") > 0)
            .await,
        "the producer queue filled"
    );
    assert_eq!(
        device.recv_within(Duration::from_secs(2)).await,
        Err(()),
        "no ack while nothing is delivered"
    );
    kafka(&["start"]).await;
    for pkid in 2..=201u16 {
        assert_eq!(device.recv_within(Duration::from_secs(90)).await, Ok(Some(Packet::PubAck(pkid))));
    }
    // Waiting on a full queue failed nothing: no retry, no failed record, every record once.
    assert_eq!(gw.metric("weir_records_failed_total"), 0);
    assert_eq!(labelled(&gw, "weir_sink_errors_total", "fatal"), 0);
    let t = topic.clone();
    let messages =
        tokio::task::spawn_blocking(move || read_topic(&t, 201, Duration::from_secs(60))).await.unwrap();
    assert_eq!(messages.len(), 201);
    gw.gateway.shutdown().await;
}

/// The value of `name{reason="REASON"}`.
fn labelled(gw: &TestGateway, name: &str, reason: &str) -> u64 {
    let prefix = format!("{name}{{reason=\"{reason}\"}} ");
    gw.gateway
        .metrics()
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}
