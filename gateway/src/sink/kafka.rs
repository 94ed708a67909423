//! The Kafka sink: an idempotent rdkafka producer (acks=all). A record's ack completes when its
//! delivery report arrives; a full producer queue is backpressure, not an error; records Kafka
//! refuses for good go to the dead-letter topic with the reason.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prost::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;

use super::encode::write_record_json;
use super::{protocol_name, Pending, Sink, SinkError, WriteReport};
use crate::config::{KafkaEncoding, KafkaSinkConfig};
use crate::fabric::{Batch, Payload};
use crate::metrics::{Metrics, ReasonLabel};

/// Producer settings weir's guarantees rest on; `librdkafka_options` may not contradict them.
/// (The load-test raw producer baseline uses the same list.)
fn guaranteed_settings(config: &KafkaSinkConfig) -> Vec<(&'static str, String)> {
    vec![
        ("enable.idempotence", "true".into()),
        ("acks", "all".into()),
        ("compression.type", config.compression.as_str().into()),
        ("linger.ms", config.linger_ms.to_string()),
        ("batch.size", config.batch_max_bytes.to_string()),
        ("queue.buffering.max.messages", "100000".into()),
        ("queue.buffering.max.kbytes", "1048576".into()),
        ("max.in.flight.requests.per.connection", "5".into()),
        // Never give up on a record: an outage holds acks back (backpressure) instead of
        // failing them; shutdown's grace period bounds the wait.
        ("message.timeout.ms", "0".into()),
        ("retry.backoff.ms", "100".into()),
        ("statistics.interval.ms", "1000".into()),
    ]
}

const CONTENT_TYPE_PROTOBUF: &str = "application/x-protobuf; messageType=weir.v1.Record";
const CONTENT_TYPE_JSON: &str = "application/json";
const CONTENT_TYPE_RAW: &str = "application/octet-stream";
/// Room kept for headers and framing when a dead letter's value is cut to fit.
const DEAD_LETTER_HEADROOM: usize = 4096;
/// How often a topic found missing (with `create_topics = false`) is looked up again.
const MISSING_TOPIC_RECHECK: Duration = Duration::from_secs(30);

/// Checks a Kafka topic name: 1 to 249 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn check_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 249 {
        return Err("a topic name has 1 to 249 characters".into());
    }
    if name == "." || name == ".." {
        return Err("\".\" and \"..\" are not topic names".into());
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("{c:?} is not allowed in a topic name (only A-Z a-z 0-9 . _ -)"));
    }
    Ok(())
}

/// The topic for a record from `source` under `template`: `{topic}` becomes the source topic
/// with `/` mapped to `.` and other characters Kafka does not allow replaced by `_`.
pub fn topic_for(template: &str, source: &str) -> String {
    if !template.contains("{topic}") {
        return template.to_owned();
    }
    let mapped: String = source
        .chars()
        .map(|c| match c {
            '/' => '.',
            c if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') => c,
            _ => '_',
        })
        .collect();
    let mut topic = template.replace("{topic}", &mapped);
    if topic.len() > 249 {
        topic.truncate(249);
    }
    topic
}

/// librdkafka callbacks: broker state and queue depth from statistics, errors counted.
struct KafkaContext {
    metrics: Arc<Metrics>,
}

impl ClientContext for KafkaContext {
    fn stats(&self, statistics: Statistics) {
        self.metrics.kafka_queue_messages.set(statistics.msg_cnt as i64);
        let up = statistics.brokers.values().any(|b| b.nodeid >= 0 && b.state == "UP");
        self.metrics.sink_connected.set(i64::from(up));
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let kind = match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::AllBrokersDown) => {
                self.metrics.sink_connected.set(0);
                "all_brokers_down"
            }
            Some(RDKafkaErrorCode::BrokerTransportFailure) => "transport",
            Some(RDKafkaErrorCode::Fatal) => "fatal",
            _ => "client",
        };
        self.metrics.kafka_errors.get_or_create(&ReasonLabel { reason: kind }).inc();
        if kind == "transport" {
            tracing::debug!(%error, reason, "kafka client error");
        } else {
            tracing::warn!(%error, reason, "kafka client error");
        }
    }
}

type Producer_ = FutureProducer<KafkaContext>;

enum TopicState {
    Ready,
    Missing { since: Instant },
}

pub struct KafkaSink {
    config: KafkaSinkConfig,
    producer: Arc<Mutex<Arc<Producer_>>>,
    admin: AdminClient<DefaultClientContext>,
    topics: HashMap<String, TopicState>,
    /// Largest message librdkafka accepts (`message.max.bytes`): dead letters are cut to fit.
    message_max_bytes: usize,
    metrics: Arc<Metrics>,
}

impl KafkaSink {
    /// Builds the producer and admin client. Connecting is lazy.
    pub fn open(config: &KafkaSinkConfig, metrics: Arc<Metrics>) -> Result<Self, String> {
        let producer = build_producer(config, &metrics)?;
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .create()
            .map_err(|e| format!("kafka admin client: {e}"))?;
        let message_max_bytes = config
            .librdkafka_options
            .get("message.max.bytes")
            .and_then(|v| v.to_string().parse().ok())
            .unwrap_or(1_000_000);
        metrics.sink_connected.set(0);
        // Topics (the dead-letter one included) are made ready on first use, so a broker that
        // is down at start delays the first commit instead of the start.
        Ok(Self {
            config: config.clone(),
            producer: Arc::new(Mutex::new(Arc::new(producer))),
            admin,
            topics: HashMap::new(),
            message_max_bytes,
            metrics,
        })
    }

    fn producer(&self) -> Arc<Producer_> {
        Arc::clone(&self.producer.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Replaces a producer that hit a fatal error. Records it still held fail their batches,
    /// which the driver resubmits to the new producer; nothing acked is affected.
    fn rebuild_if_fatal(&mut self) -> Result<(), SinkError> {
        let producer = self.producer();
        let Some((code, reason)) = producer.client().fatal_error() else { return Ok(()) };
        tracing::error!(?code, reason, "kafka producer hit a fatal error; rebuilding it");
        let fresh = build_producer(&self.config, &self.metrics).map_err(SinkError::Retriable)?;
        *self.producer.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(fresh);
        self.metrics.kafka_producer_rebuilds.inc();
        Ok(())
    }

    /// Makes sure `topic` exists: created when allowed, else looked up. `Ok(false)` when it
    /// is missing and may not be created: its records go to the dead-letter topic.
    async fn ensure_topic(&mut self, topic: &str) -> Result<bool, SinkError> {
        match self.topics.get(topic) {
            Some(TopicState::Ready) => return Ok(true),
            Some(TopicState::Missing { since }) if since.elapsed() < MISSING_TOPIC_RECHECK => {
                return Ok(false)
            }
            _ => {}
        }
        let exists = if self.config.create_topics {
            let new = NewTopic::new(
                topic,
                self.config.topic_partitions,
                TopicReplication::Fixed(self.config.topic_replication_factor),
            );
            let options = AdminOptions::new()
                .operation_timeout(Some(Duration::from_secs(10)))
                .request_timeout(Some(Duration::from_secs(10)));
            let results = self
                .admin
                .create_topics([&new], &options)
                .await
                .map_err(|e| SinkError::Retriable(format!("kafka: creating topic {topic}: {e}")))?;
            for result in results {
                match result {
                    Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((_, code)) => {
                        return Err(SinkError::Retriable(format!("kafka: creating topic {topic}: {code}")))
                    }
                }
            }
            tracing::info!(topic, "kafka topic ready");
            true
        } else {
            let producer = self.producer();
            let name = topic.to_owned();
            let metadata = tokio::task::spawn_blocking(move || {
                producer.client().fetch_metadata(Some(&name), Duration::from_secs(10))
            })
            .await
            .map_err(|e| SinkError::Retriable(format!("kafka metadata lookup failed: {e}")))?
            .map_err(|e| SinkError::Retriable(format!("kafka: looking up topic {topic}: {e}")))?;
            metadata
                .topics()
                .iter()
                .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        };
        if self.topics.len() > 10_000 {
            // Many distinct source topics: forget, rather than grow without bound.
            self.topics.clear();
        }
        let state = if exists { TopicState::Ready } else { TopicState::Missing { since: Instant::now() } };
        self.topics.insert(topic.to_owned(), state);
        Ok(exists)
    }
}

fn build_producer(config: &KafkaSinkConfig, metrics: &Arc<Metrics>) -> Result<Producer_, String> {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.brokers);
    for (key, value) in &config.librdkafka_options {
        client.set(key, value.to_string());
    }
    for (key, value) in guaranteed_settings(config) {
        client.set(key, value);
    }
    client
        .create_with_context(KafkaContext { metrics: Arc::clone(metrics) })
        .map_err(|e| format!("kafka producer: {e}"))
}

/// One message to produce, owned so it can be retried after a full queue.
struct Outgoing {
    topic: String,
    key: String,
    value: Vec<u8>,
    headers: OwnedHeaders,
    timestamp_ms: i64,
    /// Set for dead letters: counted as such in the report.
    dead_letter_reason: Option<&'static str>,
}

impl Sink for KafkaSink {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn max_in_flight(&self) -> usize {
        self.config.max_in_flight_batches
    }

    async fn submit(&mut self, batch: Arc<Batch>) -> Result<Pending, SinkError> {
        self.rebuild_if_fatal()?;
        let mut outgoing = Vec::with_capacity(batch.len());
        for item in &batch.items {
            let message = match &item.payload {
                Payload::Record(record) => {
                    let topic = topic_for(&self.config.topic, &record.source);
                    let mut value = Vec::with_capacity(256);
                    let content_type = match self.config.encoding {
                        KafkaEncoding::Protobuf => {
                            // Encoding into a Vec cannot run out of room.
                            let _ = record.encode(&mut value);
                            CONTENT_TYPE_PROTOBUF
                        }
                        KafkaEncoding::Json => {
                            write_record_json(record, &mut value);
                            CONTENT_TYPE_JSON
                        }
                    };
                    let headers = headers(
                        content_type,
                        protocol_name(record.protocol()),
                        &record.source,
                        record.received_ts_ms,
                    );
                    let message = Outgoing {
                        topic,
                        key: record.device_id.clone(),
                        value,
                        headers,
                        timestamp_ms: record.received_ts_ms,
                        dead_letter_reason: None,
                    };
                    if !self.ensure_topic(&message.topic).await? {
                        let reason =
                            format!("topic {} does not exist and create_topics is false", message.topic);
                        self.dead_letter(message, "unknown_topic", &reason)
                    } else if message.value.len() + message.key.len() > self.message_max_bytes {
                        let reason = format!(
                            "record of {} bytes is larger than message.max.bytes ({})",
                            message.value.len(),
                            self.message_max_bytes
                        );
                        self.dead_letter(message, "too_large", &reason)
                    } else {
                        message
                    }
                }
                Payload::DeadLetter(letter) => {
                    let message = Outgoing {
                        topic: String::new(),
                        key: letter.device_id.clone(),
                        value: letter.raw.to_vec(),
                        headers: headers(
                            CONTENT_TYPE_RAW,
                            protocol_name(letter.protocol),
                            &letter.source,
                            letter.received_ts_ms,
                        ),
                        timestamp_ms: letter.received_ts_ms,
                        dead_letter_reason: None,
                    };
                    self.dead_letter(message, "undecodable", &letter.error)
                }
            };
            outgoing.push(message);
        }
        let dead_letter_topic = self.config.dead_letter_topic.clone();
        if outgoing.iter().any(|m| m.dead_letter_reason.is_some())
            && !self.ensure_topic(&dead_letter_topic).await?
        {
            return Err(SinkError::Retriable(format!(
                "dead-letter topic {dead_letter_topic} does not exist (create it, or set create_topics = true)"
            )));
        }

        let producer = self.producer();
        let mut deliveries = Vec::with_capacity(outgoing.len());
        for message in &outgoing {
            deliveries.push(produce(&producer, message, &self.metrics).await?);
        }
        let records = outgoing.len();
        let dead_letters = outgoing.iter().filter(|m| m.dead_letter_reason.is_some()).count();
        let metrics = Arc::clone(&self.metrics);
        metrics.sink_in_flight_records.inc_by(records as i64);
        Ok(Box::pin(async move {
            let result = await_deliveries(deliveries, &metrics).await;
            metrics.sink_in_flight_records.dec_by(records as i64);
            result.map(|()| WriteReport { records: records - dead_letters, duplicates: 0, dead_letters })
        }))
    }
}

impl KafkaSink {
    /// Turns `message` into a dead letter: the dead-letter topic, the reason in a header, the
    /// value cut to what Kafka accepts.
    fn dead_letter(&self, mut message: Outgoing, kind: &'static str, reason: &str) -> Outgoing {
        let limit = self.message_max_bytes.saturating_sub(DEAD_LETTER_HEADROOM + message.key.len()).max(1024);
        let truncated = message.value.len() > limit;
        if truncated {
            message.value.truncate(limit);
        }
        let mut headers = message.headers.insert(Header { key: "weir-error", value: Some(reason) });
        headers = headers.insert(Header { key: "weir-error-kind", value: Some(kind) });
        if truncated {
            headers = headers.insert(Header { key: "weir-truncated", value: Some("true") });
        }
        message.headers = headers;
        message.topic = self.config.dead_letter_topic.clone();
        message.dead_letter_reason = Some(kind);
        self.metrics.kafka_dead_lettered.get_or_create(&ReasonLabel { reason: kind }).inc();
        tracing::debug!(kind, reason, device = message.key, "record sent to the dead-letter topic");
        message
    }
}

fn headers(content_type: &str, protocol: &str, source: &str, received_ts_ms: i64) -> OwnedHeaders {
    let received = received_ts_ms.to_string();
    OwnedHeaders::new_with_capacity(4)
        .insert(Header { key: "content-type", value: Some(content_type) })
        .insert(Header { key: "weir-protocol", value: Some(protocol) })
        .insert(Header { key: "weir-source", value: Some(source) })
        .insert(Header { key: "weir-received-ms", value: Some(received.as_str()) })
}

/// Hands one message to librdkafka, waiting while its queue is full (backpressure).
async fn produce(
    producer: &Producer_,
    message: &Outgoing,
    metrics: &Metrics,
) -> Result<DeliveryFuture, SinkError> {
    let mut record = FutureRecord::to(&message.topic)
        .key(message.key.as_bytes())
        .payload(&message.value[..])
        .headers(message.headers.clone())
        .timestamp(message.timestamp_ms);
    let mut waited = false;
    loop {
        match producer.send_result(record) {
            Ok(delivery) => {
                if waited {
                    metrics.sink_ready.set(1);
                }
                return Ok(delivery);
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                // Not an error: the producer is not ready. Wait for deliveries to free room.
                if !waited {
                    metrics.kafka_errors.get_or_create(&ReasonLabel { reason: "queue_full" }).inc();
                    waited = true;
                }
                record = back;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err((error, _)) => {
                metrics.kafka_errors.get_or_create(&ReasonLabel { reason: "produce" }).inc();
                return Err(SinkError::Retriable(format!("kafka produce to {}: {error}", message.topic)));
            }
        }
    }
}

/// Waits for every delivery report of a batch. Any failure fails the batch (retriable: the
/// driver resubmits it; the (device_id, seq) key lets consumers drop the duplicates).
async fn await_deliveries(deliveries: Vec<DeliveryFuture>, metrics: &Metrics) -> Result<(), SinkError> {
    let mut first_error = None;
    for delivery in deliveries {
        let error = match delivery.await {
            Ok(Ok(_)) => continue,
            Ok(Err((error, _))) => error.to_string(),
            Err(_) => "producer dropped before the delivery report".to_owned(),
        };
        metrics.kafka_errors.get_or_create(&ReasonLabel { reason: "delivery" }).inc();
        first_error.get_or_insert(error);
    }
    match first_error {
        None => Ok(()),
        Some(error) => Err(SinkError::Retriable(format!("kafka delivery failed: {error}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_template_maps_source_topics() {
        assert_eq!(topic_for("telemetry.{topic}", "devices/d1/temp"), "telemetry.devices.d1.temp");
        assert_eq!(topic_for("t.{topic}", "a b/c+#ü"), "t.a_b.c___");
        assert_eq!(topic_for("fixed", "devices/d1"), "fixed");
        assert_eq!(topic_for("{topic}", &"x".repeat(300)).len(), 249);
        for source in ["devices/d1/temp", "a b/c+#ü", "", "/"] {
            let topic = topic_for("telemetry.{topic}", source);
            assert!(check_topic_name(&topic).is_ok(), "{topic}");
        }
    }

    #[test]
    fn topic_names_are_checked() {
        assert!(check_topic_name("weir.dead-letter").is_ok());
        assert!(check_topic_name("").is_err());
        assert!(check_topic_name("..").is_err());
        assert!(check_topic_name("a/b").is_err());
        assert!(check_topic_name(&"a".repeat(250)).is_err());
    }
}
