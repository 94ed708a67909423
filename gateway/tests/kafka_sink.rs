//! The Kafka sink against the real broker from `deploy/local/kafka.sh` (started by the test
//! command): records keyed by device, in per-device order, with headers and decodable values;
//! dead letters with reasons. Fault tests (broker down, killed) are in `kafka_faults.rs`.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::kafka::*;
use common::*;
use prost::Message as _;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet as RPacket, QoS as RQoS};
use weir_proto::Record;
use weir_protocols::mqtt::{Packet, QoS};

fn kafka_sink(topic: &str, dead_letter_topic: &str, extra: &str) -> String {
    format!(
        "[fabric]\nlinger_ms = 2\n[sink]\nkind = \"kafka\"\nbrokers = \"{}\"\ntopic = \"{topic}\"\n\
         dead_letter_topic = \"{dead_letter_topic}\"\ntopic_partitions = 3\n{extra}",
        brokers()
    )
}

async fn read(topic: &str, want: usize) -> Vec<Msg> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || read_topic(&topic, want, Duration::from_secs(60))).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_records_reach_kafka_keyed_in_order_with_headers() {
    let topic = unique_topic("weir-it");
    let gw =
        TestGateway::start(&kafka_sink(&format!("{topic}.{{topic}}"), &unique_topic("weir-dl"), "")).await;
    let addr = gw.mqtt_addr();

    // Two rumqttc devices interleaving QoS 1 publishes.
    let mut tasks = Vec::new();
    for device in ["kafka-a", "kafka-b"] {
        let mut options = MqttOptions::new(device, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(options, 32);
        tasks.push(tokio::spawn(async move {
            let publisher = tokio::spawn(async move {
                for seq in 1..=60u64 {
                    let payload = reading(device, seq);
                    client
                        .publish(format!("devices/{device}/telemetry"), RQoS::AtLeastOnce, false, payload)
                        .await
                        .unwrap();
                }
                client
            });
            let mut acked = 0;
            while acked < 60 {
                if let Event::Incoming(RPacket::PubAck(_)) = eventloop.poll().await.unwrap() {
                    acked += 1;
                }
            }
            publisher.await.unwrap();
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t).await.expect("every publish acked").unwrap();
    }
    // The stock client too.
    let status = std::process::Command::new("mosquitto_pub")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string(), "-q", "1", "-i", "kafka-mosq"])
        .args(["-t", "devices/kafka-mosq/telemetry", "-m", r#"{"seq":1,"temp":19.5}"#])
        .status()
        .expect("mosquitto_pub must be installed");
    assert!(status.success());

    // Acked means delivered: everything is readable now.
    let a_topic = format!("{topic}.devices.kafka-a.telemetry");
    let messages = read(&a_topic, 60).await;
    assert_eq!(messages.len(), 60, "exactly the acked records, no duplicates");
    let b = read(&format!("{topic}.devices.kafka-b.telemetry"), 60).await;
    assert_eq!(b.len(), 60);
    let mosq = read(&format!("{topic}.devices.kafka-mosq.telemetry"), 1).await;
    assert_eq!(mosq.len(), 1);
    assert_eq!(mosq[0].key, "kafka-mosq");

    // Keyed by device, so one partition per device, and in publish order within it.
    let partitions: std::collections::HashSet<_> = messages.iter().map(|m| m.partition).collect();
    assert_eq!(partitions.len(), 1);
    let mut sorted = messages.clone();
    sorted.sort_by_key(|m| m.offset);
    let seqs: Vec<u64> = sorted.iter().map(|m| Record::decode(&m.value[..]).unwrap().seq.unwrap()).collect();
    assert_eq!(seqs, (1..=60).collect::<Vec<_>>());

    let m = &sorted[0];
    assert_eq!(m.key, "kafka-a");
    assert_eq!(m.headers["content-type"], "application/x-protobuf; messageType=weir.v1.Record");
    assert_eq!(m.headers["weir-protocol"], "mqtt");
    assert_eq!(m.headers["weir-source"], "devices/kafka-a/telemetry");
    let received: i64 = m.headers["weir-received-ms"].parse().unwrap();
    let record = Record::decode(&m.value[..]).unwrap();
    assert_eq!(record.device_id, "kafka-a");
    assert_eq!(record.received_ts_ms, received);
    assert_eq!(record.source, "devices/kafka-a/telemetry");
    assert!(
        matches!(record.metrics["temp"].kind, Some(weir_proto::metric_value::Kind::Number(t)) if t == 21.5)
    );
    assert_eq!(gw.metric("weir_records_committed_total"), 121);
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_encoding_and_a_fixed_topic() {
    let topic = unique_topic("weir-json");
    let gw = TestGateway::start(&kafka_sink(&topic, &unique_topic("weir-dl"), "encoding = \"json\"\n")).await;
    let mut client = RawClient::connect(gw.mqtt_addr(), "json-dev").await;
    client.send(&publish(QoS::AtLeastOnce, 1, "any/topic", reading("json-dev", 5))).await;
    assert_eq!(client.recv_within(Duration::from_secs(30)).await, Ok(Some(Packet::PubAck(1))));
    let messages = read(&topic, 1).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].headers["content-type"], "application/json");
    let value: serde_json::Value = serde_json::from_slice(&messages[0].value).unwrap();
    assert_eq!(value["device_id"], "json-dev");
    assert_eq!(value["seq"], 5);
    assert_eq!(value["metrics"]["temp"], 21.5);
    assert_eq!(value["source"], "any/topic");
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_and_oversized_records_go_to_the_dead_letter_topic() {
    let topic = unique_topic("weir-big");
    let dead = unique_topic("weir-dl");
    let extra = "[sink.librdkafka_options]\n\"message.max.bytes\" = 20000\n";
    let gw = TestGateway::start(&kafka_sink(&topic, &dead, extra)).await;
    let mut client = RawClient::connect(gw.mqtt_addr(), "dl-dev").await;
    client.send(&publish(QoS::AtLeastOnce, 1, "devices/dl-dev/t", "temp=21".into())).await;
    let big = format!(r#"{{"device_id":"dl-dev","seq":2,"blob":"{}"}}"#, "y".repeat(30_000));
    client.send(&publish(QoS::AtLeastOnce, 2, "devices/dl-dev/t", big)).await;
    client.send(&publish(QoS::AtLeastOnce, 3, "devices/dl-dev/t", reading("dl-dev", 3))).await;
    for pkid in 1..=3 {
        // Dead-lettered is a durable outcome: acked once the dead-letter topic has it.
        assert_eq!(client.recv_within(Duration::from_secs(30)).await, Ok(Some(Packet::PubAck(pkid))));
    }
    let letters = read(&dead, 2).await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    let by_kind: BTreeMap<_, _> = letters.iter().map(|m| (m.headers["weir-error-kind"].clone(), m)).collect();
    let undecodable = by_kind["undecodable"];
    assert_eq!(undecodable.value, b"temp=21");
    assert_eq!(undecodable.key, "dl-dev");
    assert!(undecodable.headers["weir-error"].contains("not JSON"), "{:?}", undecodable.headers);
    assert_eq!(undecodable.headers["weir-source"], "devices/dl-dev/t");
    let too_large = by_kind["too_large"];
    assert!(too_large.headers["weir-error"].contains("message.max.bytes (20000)"), "{:?}", too_large.headers);
    assert_eq!(too_large.headers["weir-truncated"], "true");
    assert!(too_large.value.len() < 20_000);
    // The good record went to its topic.
    let good = read(&topic, 1).await;
    assert_eq!(good.len(), 1);
    assert_eq!(Record::decode(&good[0].value[..]).unwrap().seq, Some(3));
    assert_eq!(gw.metric("weir_kafka_dead_lettered_total"), 2);
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topic_without_create_goes_to_the_dead_letter_topic() {
    let dead = unique_topic("weir-dl");
    // The dead-letter topic exists; the record topic does not, and weir may not create it.
    let gw = TestGateway::start(&kafka_sink(&dead, &dead, "")).await;
    let mut client = RawClient::connect(gw.mqtt_addr(), "mk-dev").await;
    client.send(&publish(QoS::AtLeastOnce, 1, "t", reading("mk-dev", 1))).await;
    assert_eq!(client.recv_within(Duration::from_secs(30)).await, Ok(Some(Packet::PubAck(1))));
    gw.gateway.shutdown().await;

    let missing = unique_topic("weir-missing");
    let gw = TestGateway::start(&kafka_sink(&missing, &dead, "create_topics = false\n")).await;
    let mut client = RawClient::connect(gw.mqtt_addr(), "mk-dev").await;
    client.send(&publish(QoS::AtLeastOnce, 1, "t", reading("mk-dev", 2))).await;
    assert_eq!(client.recv_within(Duration::from_secs(30)).await, Ok(Some(Packet::PubAck(1))));
    let letters = read(&dead, 2).await;
    let letter = letters
        .iter()
        .find(|m| m.headers.get("weir-error-kind").map(String::as_str) == Some("unknown_topic"));
    let letter = letter.expect("the record is on the dead-letter topic");
    assert!(letter.headers["weir-error"].contains(&missing));
    gw.gateway.shutdown().await;
}
