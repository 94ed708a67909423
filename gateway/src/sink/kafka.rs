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
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;
use tokio::sync::oneshot;

use super::{protocol_name, Pending, Sink, SinkError, WriteReport};
use crate::config::{KafkaEncoding, KafkaSinkConfig};
use crate::fabric::{Batch, Payload};
use crate::metrics::{Metrics, ReasonLabel};
use weir_protocols::record_json::write_record_json;

/// Producer settings weir's guarantees rest on; `librdkafka_options` may not contradict them.
/// (The load-test raw producer baseline uses the same list.)
fn guaranteed_settings(config: &KafkaSinkConfig) -> Vec<(&'static str, String)> {
    vec![
        ("enable.idempotence", "true".into()),
        ("acks", "all".into()),
        ("compression.type", config.compression.as_str().into()),
        ("linger.ms", config.linger_ms.to_string()),
        ("batch.size", config.batch_max_bytes.to_string()),
        ("queue.buffering.max.messages", config.queue_max_messages.to_string()),
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

impl ProducerContext for KafkaContext {
    type DeliveryOpaque = Arc<BatchDelivery>;

    fn delivery(&self, result: &DeliveryResult<'_>, batch: Arc<BatchDelivery>) {
        match result {
            Ok(_) => batch.settle_one(None),
            Err((error, _)) => batch.settle_one(Some(error.to_string())),
        }
    }
}

/// Delivery reports of one submitted batch: counts down to zero, keeps the first error, and
/// then wakes the batch's pending write. One shared value per batch, not one channel per record.
pub(crate) struct BatchDelivery {
    remaining: std::sync::atomic::AtomicUsize,
    first_error: Mutex<Option<String>>,
    done_tx: Mutex<Option<oneshot::Sender<()>>>,
}

impl BatchDelivery {
    fn new(records: usize) -> (Arc<Self>, oneshot::Receiver<()>) {
        let (done_tx, done_rx) = oneshot::channel();
        let batch = Arc::new(Self {
            remaining: std::sync::atomic::AtomicUsize::new(records),
            first_error: Mutex::new(None),
            done_tx: Mutex::new(Some(done_tx)),
        });
        if records == 0 {
            batch.finish();
        }
        (batch, done_rx)
    }

    fn settle_one(&self, error: Option<String>) {
        if let Some(error) = error {
            self.first_error.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(error);
        }
        if self.remaining.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            self.finish();
        }
    }

    fn finish(&self) {
        if let Some(tx) = self.done_tx.lock().unwrap_or_else(PoisonError::into_inner).take() {
            let _ = tx.send(());
        }
    }

    fn first_error(&self) -> Option<String> {
        self.first_error.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

type Producer_ = ThreadedProducer<KafkaContext>;

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
    /// The topic when the template has no `{topic}`.
    fixed_topic: Option<Arc<str>>,
    /// Template expansions by source topic.
    source_topics: HashMap<String, Arc<str>>,
    dead_letter_topic: Arc<str>,
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
            fixed_topic: (!config.topic.contains("{topic}")).then(|| Arc::from(config.topic.as_str())),
            source_topics: HashMap::new(),
            dead_letter_topic: Arc::from(config.dead_letter_topic.as_str()),
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

impl Sink for KafkaSink {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn max_in_flight(&self) -> usize {
        self.config.max_in_flight_batches
    }

    async fn submit(&mut self, batch: Arc<Batch>) -> Result<Pending, SinkError> {
        self.rebuild_if_fatal()?;
        let records = batch.len();
        let (delivery, done_rx) = BatchDelivery::new(records);
        let producer = self.producer();
        let mut value = Vec::with_capacity(512);
        let mut dead_letters = 0;
        for item in &batch.items {
            value.clear();
            let (topic, headers, problem) = match &item.payload {
                Payload::Record(record) => {
                    let topic = self.topic_for_source(&record.source);
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
                    let problem = if !self.ensure_topic(&topic).await? {
                        Some((
                            "unknown_topic",
                            format!("topic {topic} does not exist and create_topics is false"),
                        ))
                    } else if value.len() + record.device_id.len() > self.message_max_bytes {
                        let reason = format!(
                            "record of {} bytes is larger than message.max.bytes ({})",
                            value.len(),
                            self.message_max_bytes
                        );
                        Some(("too_large", reason))
                    } else {
                        None
                    };
                    (topic, headers, problem)
                }
                Payload::DeadLetter(letter) => {
                    value.extend_from_slice(&letter.raw);
                    let headers = headers(
                        CONTENT_TYPE_RAW,
                        protocol_name(letter.protocol),
                        &letter.source,
                        letter.received_ts_ms,
                    );
                    (Arc::from(""), headers, Some(("undecodable", letter.error.clone())))
                }
            };
            let (topic, headers) = match problem {
                None => (topic, headers),
                Some((kind, reason)) => {
                    dead_letters += 1;
                    let dead_letter_topic = Arc::clone(&self.dead_letter_topic);
                    if !self.ensure_topic(&dead_letter_topic).await? {
                        return Err(SinkError::Retriable(format!(
                            "dead-letter topic {dead_letter_topic} does not exist (create it, or set create_topics = true)"
                        )));
                    }
                    (
                        dead_letter_topic,
                        self.dead_letter(&mut value, item.device_id(), headers, kind, &reason),
                    )
                }
            };
            let record = BaseRecord::with_opaque_to(&topic, Arc::clone(&delivery))
                .key(item.device_id())
                .payload(&value[..])
                .headers(headers)
                .timestamp(item_timestamp(item));
            produce(&producer, record, &self.metrics).await?;
        }
        let metrics = Arc::clone(&self.metrics);
        metrics.sink_in_flight_records.inc_by(records as i64);
        Ok(Box::pin(async move {
            // The sender lives in `delivery` until every report arrived; a dropped producer
            // purges its queue and still reports each record (as failed).
            let completed = done_rx.await.is_ok();
            metrics.sink_in_flight_records.dec_by(records as i64);
            match delivery.first_error() {
                None if completed => {
                    Ok(WriteReport { records: records - dead_letters, duplicates: 0, dead_letters })
                }
                None => {
                    Err(SinkError::Retriable("kafka producer went away before every delivery report".into()))
                }
                Some(error) => {
                    metrics.kafka_errors.get_or_create(&ReasonLabel { reason: "delivery" }).inc();
                    // The driver resubmits the batch; the (device_id, seq) key lets consumers
                    // drop the records the first attempt did deliver.
                    Err(SinkError::Retriable(format!("kafka delivery failed: {error}")))
                }
            }
        }))
    }
}

fn item_timestamp(item: &crate::fabric::Item) -> i64 {
    match &item.payload {
        Payload::Record(r) => r.received_ts_ms,
        Payload::DeadLetter(d) => d.received_ts_ms,
    }
}

impl KafkaSink {
    /// The topic for a record from `source`, cached (a template expands once per source topic).
    fn topic_for_source(&mut self, source: &str) -> Arc<str> {
        if let Some(fixed) = &self.fixed_topic {
            return Arc::clone(fixed);
        }
        if let Some(topic) = self.source_topics.get(source) {
            return Arc::clone(topic);
        }
        if self.source_topics.len() > 10_000 {
            self.source_topics.clear();
        }
        let topic: Arc<str> = topic_for(&self.config.topic, source).into();
        self.source_topics.insert(source.to_owned(), Arc::clone(&topic));
        topic
    }

    /// Makes `value` a dead letter: cut to what Kafka accepts, the reason in headers.
    fn dead_letter(
        &self,
        value: &mut Vec<u8>,
        device_id: &str,
        headers: OwnedHeaders,
        kind: &'static str,
        reason: &str,
    ) -> OwnedHeaders {
        let limit = self.message_max_bytes.saturating_sub(DEAD_LETTER_HEADROOM + device_id.len()).max(1024);
        let truncated = value.len() > limit;
        value.truncate(limit);
        let mut headers = headers
            .insert(Header { key: "weir-error", value: Some(reason) })
            .insert(Header { key: "weir-error-kind", value: Some(kind) });
        if truncated {
            headers = headers.insert(Header { key: "weir-truncated", value: Some("true") });
        }
        self.metrics.kafka_dead_lettered.get_or_create(&ReasonLabel { reason: kind }).inc();
        tracing::debug!(kind, reason, device = device_id, "record sent to the dead-letter topic");
        headers
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

/// Hands one message to librdkafka (which copies it), waiting while its queue is full: that
/// wait is the backpressure, not an error.
async fn produce(
    producer: &Producer_,
    mut record: BaseRecord<'_, str, [u8], Arc<BatchDelivery>>,
    metrics: &Metrics,
) -> Result<(), SinkError> {
    let mut waited = false;
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                if !waited {
                    metrics.kafka_errors.get_or_create(&ReasonLabel { reason: "queue_full" }).inc();
                    waited = true;
                }
                record = back;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err((error, back)) => {
                metrics.kafka_errors.get_or_create(&ReasonLabel { reason: "produce" }).inc();
                // Not queued: no report will come for it, so count it here.
                back.delivery_opaque.settle_one(Some(error.to_string()));
                return Err(SinkError::Retriable(format!("kafka produce to {}: {error}", back.topic)));
            }
        }
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
