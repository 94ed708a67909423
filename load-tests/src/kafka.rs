//! What weir's Kafka sink and the raw producer baseline share: the librdkafka producer settings,
//! the message layout (key, headers), and topic creation with the admin API.

use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

/// Header naming the value encoding; see [`PROTOBUF_CONTENT_TYPE`] and [`JSON_CONTENT_TYPE`].
pub const CONTENT_TYPE_HEADER: &str = "content-type";
/// `content-type` of a protobuf `weir.v1.Record` value (weir's default encoding).
pub const PROTOBUF_CONTENT_TYPE: &str = "application/x-protobuf; messageType=weir.v1.Record";
/// `content-type` of a JSON record value (an object with at least `device_id` and `seq`).
pub const JSON_CONTENT_TYPE: &str = "application/json";
/// Header with the source protocol's name, see [`protocol_name`].
pub const PROTOCOL_HEADER: &str = "weir-protocol";
/// Header with the record's source: the MQTT topic, WebSocket/HTTP path or TCP listener.
pub const SOURCE_HEADER: &str = "weir-source";
/// Header with the gateway receive time, decimal milliseconds since the Unix epoch.
pub const RECEIVED_MS_HEADER: &str = "weir-received-ms";

/// How long admin requests and the wait for partition leaders may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The librdkafka producer settings of weir's Kafka sink, and so of the raw producer baseline:
/// the one list both are configured from (the sink's config doc copies it).
///
/// - `enable.idempotence=true`, `acks=all`, `max.in.flight.requests.per.connection=5`: no
///   duplicates or reordering from producer retries, and a delivery report means every in-sync
///   replica has the record; that report is what completes a device's ack.
/// - `message.timeout.ms=0` (infinite) with `retry.backoff.ms=100`: a record is retried until it
///   is delivered, never failed for taking long; an outage turns into backpressure (the queue
///   fills, the sink is not ready) instead of lost records.
/// - `compression.type=lz4`, `linger.ms=5`, `batch.size=1048576`: batches of up to 1 MiB per
///   partition, closed after 5 ms.
/// - `queue.buffering.max.messages=100000`, `queue.buffering.max.kbytes=1048576`: librdkafka's
///   own queue bound (100k records or 1 GiB); when it is full, a send returns `QueueFull`.
pub fn producer_defaults() -> Vec<(&'static str, &'static str)> {
    vec![
        ("enable.idempotence", "true"),
        ("acks", "all"),
        ("compression.type", "lz4"),
        ("linger.ms", "5"),
        ("batch.size", "1048576"),
        ("queue.buffering.max.messages", "100000"),
        ("queue.buffering.max.kbytes", "1048576"),
        ("max.in.flight.requests.per.connection", "5"),
        ("message.timeout.ms", "0"),
        ("retry.backoff.ms", "100"),
    ]
}

/// The `weir-protocol` header value for a record's source protocol: the one shared copy in
/// `weir-protocols`.
pub use weir_protocols::record_json::protocol_name;

/// What [`create_topic`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicStatus {
    Created,
    /// The topic was there already; it was left as it was (partition count included).
    Existed,
    /// The topic was deleted (with everything in it) and created anew.
    Recreated,
}

/// An admin client of `brokers`, and the timeouts its operations get.
fn admin(brokers: &str) -> anyhow::Result<(AdminClient<DefaultClientContext>, AdminOptions)> {
    let admin = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("creating the Kafka admin client")?;
    let options =
        AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT)).request_timeout(Some(ADMIN_TIMEOUT));
    Ok((admin, options))
}

/// Deletes `topics` (and everything in them); topics that do not exist are no error. Kafka
/// removes the data in the background.
pub async fn delete_topics(brokers: &str, topics: &[String]) -> anyhow::Result<()> {
    let (admin, options) = admin(brokers)?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    for result in admin.delete_topics(&names, &options).await.context("deleting topics")? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((name, code)) => bail!("deleting topic {name}: {code}"),
        }
    }
    Ok(())
}

/// Creates `topic` with `partitions` partitions and replication factor 1 unless it exists (or,
/// with `recreate`, deletes it first), then waits until every partition has a leader, so that
/// producers started right after do not wait for metadata. Needs a broker that allows topic
/// creation through the admin API (weir's local Kafka has auto-create off).
pub async fn create_topic(
    brokers: &str,
    topic: &str,
    partitions: i32,
    recreate: bool,
) -> anyhow::Result<TopicStatus> {
    if partitions < 1 {
        bail!("a topic needs at least 1 partition, not {partitions}");
    }
    let (admin, options) = admin(brokers)?;

    let mut deleted = false;
    if recreate {
        let results = admin.delete_topics(&[topic], &options).await.context("deleting the topic")?;
        for result in results {
            match result {
                Ok(_) => deleted = true,
                Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((name, code)) => bail!("deleting topic {name}: {code}"),
            }
        }
    }

    let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let give_up_at = tokio::time::Instant::now() + ADMIN_TIMEOUT;
    let status = loop {
        let results = admin
            .create_topics([&new_topic], &options)
            .await
            .with_context(|| format!("creating topic {topic} on {brokers}"))?;
        match results.into_iter().next() {
            Some(Ok(_)) => break if deleted { TopicStatus::Recreated } else { TopicStatus::Created },
            // Kafka deletes a topic in the background; until it is gone its name is taken.
            Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists)))
                if deleted && tokio::time::Instant::now() < give_up_at =>
            {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) if !deleted => break TopicStatus::Existed,
            Some(Err((name, code))) => bail!("creating topic {name}: {code}"),
            None => bail!("creating topic {topic}: the broker returned no result"),
        }
    };

    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || wait_for_leaders(&brokers, &topic))
        .await
        .context("waiting for partition leaders")??;
    Ok(status)
}

/// Polls the topic's metadata until it has at least one partition and each has a leader.
fn wait_for_leaders(brokers: &str, topic: &str) -> anyhow::Result<()> {
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("allow.auto.create.topics", "false")
        .create()
        .context("creating the Kafka metadata client")?;
    let give_up_at = std::time::Instant::now() + ADMIN_TIMEOUT;
    let mut last_problem;
    loop {
        match client.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            Ok(metadata) => match metadata.topics().iter().find(|t| t.name() == topic) {
                Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                    let leaderless = t.partitions().iter().filter(|p| p.leader() < 0).count();
                    if leaderless == 0 {
                        return Ok(());
                    }
                    last_problem = format!("{leaderless} partitions without a leader");
                }
                Some(t) => last_problem = format!("metadata error {:?}", t.error()),
                None => last_problem = "topic missing from the metadata".to_owned(),
            },
            Err(error) => last_problem = error.to_string(),
        }
        if std::time::Instant::now() >= give_up_at {
            bail!("topic {topic} not ready after {ADMIN_TIMEOUT:?}: {last_problem}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_proto::SourceProtocol;

    #[test]
    fn producer_defaults_are_weirs_settings_once_each() {
        let settings = producer_defaults();
        let mut keys: Vec<_> = settings.iter().map(|(k, _)| *k).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), settings.len(), "a key is set twice");
        let get = |key: &str| settings.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        assert_eq!(get("enable.idempotence"), Some("true"));
        assert_eq!(get("acks"), Some("all"));
        assert_eq!(get("message.timeout.ms"), Some("0"));
        assert_eq!(get("max.in.flight.requests.per.connection"), Some("5"));
    }

    #[test]
    fn producer_defaults_are_accepted_by_librdkafka() {
        // Creating a producer validates every property name and value; no broker is contacted
        // before the first send.
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", "127.0.0.1:9");
        for (key, value) in producer_defaults() {
            config.set(key, value);
        }
        let producer: Result<rdkafka::producer::BaseProducer, _> = config.create();
        assert!(producer.is_ok(), "{:?}", producer.err());
    }

    #[test]
    fn protocol_names_follow_the_listener_names() {
        assert_eq!(protocol_name(SourceProtocol::Mqtt), "mqtt");
        assert_eq!(protocol_name(SourceProtocol::Websocket), "ws");
        assert_eq!(protocol_name(SourceProtocol::MqttBridge), "mqtt_bridge");
    }
}
