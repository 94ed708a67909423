//! Reads a whole Kafka topic back (every partition, from its low watermark) into [`Found`].

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::{decode_message, Found};
use crate::kafka::CONTENT_TYPE_HEADER;

/// Metadata and watermark requests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often progress goes to stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Reads every message of `topic` and counts seqs per device; see [`consume_blocking`].
pub async fn consume(brokers: &str, topic: &str, idle: Duration) -> anyhow::Result<Found> {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || consume_blocking(&brokers, &topic, idle))
        .await
        .context("the Kafka reader thread panicked")?
}

/// Reads every message of `topic`, all partitions from their low watermarks, with partitions
/// assigned directly (no consumer group membership, nothing committed). Stops once every
/// partition has reached the high watermark read at the start and then nothing new arrived for
/// `idle` and the re-read watermarks are reached too, so records a gateway still flushes are
/// included. Fails when the topic is missing or a partition stops advancing below its high
/// watermark for `max(3 × idle, 30 s)`: a verifier that cannot read everything must not pass.
pub fn consume_blocking(brokers: &str, topic: &str, idle: Duration) -> anyhow::Result<Found> {
    let unique = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        // Required by librdkafka for a consumer; unused, as partitions are assigned directly.
        .set("group.id", format!("weir-verify-{}-{unique}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("allow.auto.create.topics", "false")
        .set("max.partition.fetch.bytes", "8388608")
        .set("fetch.max.bytes", "104857600")
        .set("queued.max.messages.kbytes", "262144")
        .create()
        .context("creating the Kafka consumer")?;

    let metadata = consumer
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .with_context(|| format!("reading the metadata of topic {topic} from {brokers}"))?;
    let Some(topic_metadata) = metadata.topics().iter().find(|t| t.name() == topic) else {
        bail!("topic {topic} is not in the metadata from {brokers}");
    };
    if let Some(error) = topic_metadata.error() {
        bail!("topic {topic}: {:?}", rdkafka::types::RDKafkaErrorCode::from(error));
    }
    let mut partitions: Vec<PartitionProgress> = Vec::new();
    for partition in topic_metadata.partitions() {
        let (low, high) = watermarks(&consumer, topic, partition.id())?;
        partitions.push(PartitionProgress { id: partition.id(), next: low, high });
    }
    if partitions.is_empty() {
        bail!("topic {topic} has no partitions");
    }
    partitions.sort_by_key(|p| p.id);
    let mut assignment = TopicPartitionList::new();
    for p in &partitions {
        assignment.add_partition_offset(topic, p.id, Offset::Offset(p.next))?;
    }
    consumer.assign(&assignment).context("assigning the topic's partitions")?;
    let total_at_start: i64 = partitions.iter().map(|p| p.high - p.next).sum();
    eprintln!("verify: reading {topic}: {} partitions, {total_at_start} messages at start", partitions.len());

    let stall_limit = (idle * 3).max(Duration::from_secs(30));
    let mut found = Found::default();
    let started = Instant::now();
    let mut last_message_at = started;
    let mut last_progress = started;
    let mut last_error: Option<String> = None;
    loop {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                last_message_at = Instant::now();
                let content_type = message
                    .headers()
                    .and_then(|h| h.iter().find(|header| header.key == CONTENT_TYPE_HEADER))
                    .and_then(|header| header.value);
                match decode_message(message.key(), content_type, message.payload().unwrap_or_default()) {
                    Ok((device_id, seq)) => found.record(&device_id, seq),
                    Err(error) => found.record_undecodable(|| {
                        format!("{topic}/{} offset {}: {error}", message.partition(), message.offset())
                    }),
                }
                if let Some(p) = partitions.iter_mut().find(|p| p.id == message.partition()) {
                    p.next = p.next.max(message.offset() + 1);
                }
            }
            Some(Err(error)) => {
                // Broker hiccups are retried by librdkafka; say each new one once.
                let text = error.to_string();
                if last_error.as_deref() != Some(text.as_str()) {
                    eprintln!("verify: consumer error (retrying): {text}");
                    last_error = Some(text);
                }
            }
            None => {}
        }

        let now = Instant::now();
        if now.duration_since(last_progress) >= PROGRESS_EVERY {
            last_progress = now;
            eprintln!(
                "verify: {} messages read, {} partitions behind",
                found.messages,
                partitions.iter().filter(|p| p.behind()).count()
            );
        }
        let quiet_for = now.duration_since(last_message_at);
        let caught_up = !partitions.iter().any(PartitionProgress::behind);
        if caught_up && quiet_for >= idle {
            // Anything written meanwhile raises a high watermark and the reading goes on.
            for p in &mut partitions {
                let (_, high) = watermarks(&consumer, topic, p.id)?;
                p.high = p.high.max(high);
            }
            if !partitions.iter().any(PartitionProgress::behind) {
                break;
            }
            last_message_at = now;
        } else if !caught_up && quiet_for >= stall_limit {
            // The consumer's position also moves past offsets that hold no message.
            let positions = consumer.position().context("reading the consumer position")?;
            for p in &mut partitions {
                if let Some(Offset::Offset(at)) =
                    positions.find_partition(topic, p.id).map(|elem| elem.offset())
                {
                    p.next = p.next.max(at);
                }
            }
            let behind: Vec<String> = partitions
                .iter()
                .filter(|p| p.behind())
                .map(|p| format!("{}: at {} of {}", p.id, p.next, p.high))
                .collect();
            if !behind.is_empty() {
                bail!(
                    "reading {topic} stalled for {stall_limit:?} below the high watermark \
                     (partition {}); last consumer error: {}",
                    behind.join(", "),
                    last_error.as_deref().unwrap_or("none")
                );
            }
        }
    }
    eprintln!(
        "verify: read {} messages from {topic} in {:.1}s ({} devices, {} undecodable)",
        found.messages,
        started.elapsed().as_secs_f64(),
        found.devices.len(),
        found.undecodable
    );
    Ok(found)
}

/// A partition's low and high watermarks. Retried for a while: right after a topic is created,
/// or while a broker restarts, the answer can be "not leader" until metadata settles.
fn watermarks(consumer: &BaseConsumer, topic: &str, partition: i32) -> anyhow::Result<(i64, i64)> {
    let give_up_at = Instant::now() + REQUEST_TIMEOUT * 3;
    loop {
        match consumer.fetch_watermarks(topic, partition, REQUEST_TIMEOUT) {
            Ok(marks) => return Ok(marks),
            Err(error) if Instant::now() < give_up_at => {
                eprintln!("verify: watermarks of {topic}/{partition}: {error}; retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(error) => {
                return Err(error).with_context(|| format!("reading the watermarks of {topic}/{partition}"))
            }
        }
    }
}

/// Where reading one partition stands.
#[derive(Debug)]
struct PartitionProgress {
    id: i32,
    /// Offset of the next message to read.
    next: i64,
    /// The high watermark to reach.
    high: i64,
}

impl PartitionProgress {
    fn behind(&self) -> bool {
        self.next < self.high
    }
}
