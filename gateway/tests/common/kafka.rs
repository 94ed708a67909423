//! Kafka helpers for the integration tests: the real local broker from `deploy/local/kafka.sh`,
//! unique topics, and reading a topic back message by message.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

/// The broker the tests use: `WEIR_TEST_KAFKA`, else the one `deploy/local/kafka.sh` starts.
pub fn brokers() -> String {
    std::env::var("WEIR_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// A topic name no other test run uses.
pub fn unique_topic(prefix: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// Runs `deploy/local/kafka.sh ARGS` and fails the test if it fails.
pub fn kafka_sh(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/local/kafka.sh");
    let status = std::process::Command::new("bash").arg(script).args(args).status().unwrap();
    assert!(status.success(), "deploy/local/kafka.sh {args:?} failed: {status}");
}

/// [`kafka_sh`] from async code (on a blocking thread).
pub async fn kafka_sh_async(args: &'static [&'static str]) {
    tokio::task::spawn_blocking(move || kafka_sh(args)).await.unwrap();
}

/// One message as read back.
#[derive(Debug, Clone)]
pub struct Msg {
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub value: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

/// Reads `topic` from the beginning until at least `want` messages arrived and then nothing new
/// for a second, or `within` passes. Blocking: call from `spawn_blocking`.
pub fn read_topic(topic: &str, want: usize, within: Duration) -> Vec<Msg> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique_topic("weir-test-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let deadline = Instant::now() + within;
    let partitions = loop {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)).unwrap();
        let found = metadata.topics().iter().find(|t| t.name() == topic && t.error().is_none());
        match found {
            Some(t) if !t.partitions().is_empty() => {
                break t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>()
            }
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            _ => panic!("topic {topic} never appeared"),
        }
    };
    let mut assignment = TopicPartitionList::new();
    for p in partitions {
        assignment.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let mut messages = Vec::new();
    let mut last_new = Instant::now();
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_owned(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                messages.push(Msg {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                    value: m.payload().unwrap_or_default().to_vec(),
                    headers,
                });
                last_new = Instant::now();
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None if messages.len() >= want && last_new.elapsed() > Duration::from_secs(1) => break,
            None => {}
        }
    }
    messages
}
