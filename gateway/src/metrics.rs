//! Every counter and gauge weir exposes on `/metrics`, in one registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabel {
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolReasonLabel {
    pub protocol: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabel {
    pub shard: u32,
}

/// All of weir's metrics. Cheap to update from any task (atomics behind `Arc`s).
pub struct Metrics {
    pub registry: Registry,
    pub connections_active: Family<ProtocolLabel, Gauge>,
    pub connections_opened: Family<ProtocolLabel, Counter>,
    pub connections_closed: Family<ProtocolReasonLabel, Counter>,
    pub connections_refused: Family<ProtocolReasonLabel, Counter>,
    pub protocol_errors: Family<ProtocolReasonLabel, Counter>,
    pub messages_received: Family<ProtocolLabel, Counter>,
    pub records_decoded: Counter,
    pub records_dead_lettered: Family<ReasonLabel, Counter>,
    pub records_enqueued: Counter,
    pub records_dropped: Family<ReasonLabel, Counter>,
    pub records_committed: Counter,
    pub records_duplicate: Counter,
    pub dead_letters_committed: Counter,
    pub records_failed: Counter,
    pub shard_records: Family<ShardLabel, Gauge>,
    pub shard_bytes: Family<ShardLabel, Gauge>,
    pub sink_batch_seconds: Histogram,
    pub sink_batch_records: Histogram,
    pub sink_errors: Family<ReasonLabel, Counter>,
    pub sink_ready: Gauge,
    pub sink_connected: Gauge,
    pub sink_in_flight_records: Gauge,
    pub kafka_queue_messages: Gauge,
    pub kafka_errors: Family<ReasonLabel, Counter>,
    pub kafka_dead_lettered: Family<ReasonLabel, Counter>,
    pub kafka_producer_rebuilds: Counter,
    pub buffer_bytes: Gauge,
    pub buffer_unacked_records: Gauge,
    pub buffer_appended_records: Counter,
    pub buffer_replayed_records: Counter,
    pub buffer_read_records: Family<SourceLabel, Counter>,
    pub buffer_corruptions: Counter,
    pub buffer_lost_records: Counter,
    pub buffer_full: Family<ReasonLabel, Counter>,
    pub buffer_waiting: Gauge,
    pub buffer_errors: Family<ReasonLabel, Counter>,
    pub buffer_fsync_seconds: Histogram,
    pub mqtt_sessions: Gauge,
    pub mqtt_sessions_resumed: Counter,
    pub mqtt_sessions_expired: Counter,
    pub mqtt_sessions_refused: Family<ReasonLabel, Counter>,
    pub mqtt_sessions_taken_over: Counter,
    pub mqtt_session_store_transactions: Counter,
    pub mqtt_session_store_requests: Counter,
    pub mqtt_session_store_pending: Gauge,
    pub mqtt_session_store_commit_seconds: Histogram,
    pub mqtt_session_store_errors: Counter,
    pub tls_handshakes: Family<ProtocolLabel, Counter>,
    pub tls_handshake_failures: Family<ProtocolReasonLabel, Counter>,
    pub tls_reloads: Family<ResultLabel, Counter>,
    pub auth_successes: Family<ProtocolLabel, Counter>,
    pub auth_failures: Family<ProtocolReasonLabel, Counter>,
    pub auth_rate_limited: Family<ProtocolLabel, Counter>,
    pub auth_reloads: Family<ResultLabel, Counter>,
    pub acl_denied: Family<ProtocolLabel, Counter>,
    pub throttled: Family<ProtocolReasonLabel, Counter>,
    pub throttled_seconds: Family<ProtocolLabel, Counter<f64, AtomicU64>>,
    pub config_reloads: Family<ResultLabel, Counter>,
    pub source_devices: Gauge,
    pub source_devices_flagged: Family<FlagLabel, Gauge>,
    pub source_devices_seen: Counter,
    pub source_devices_evicted: Counter,
    pub source_seq_missing: Counter,
    pub source_duplicates: Counter,
    pub source_reorders: Counter,
    pub source_seq_restarts: Counter,
    pub source_schema_changes: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlagLabel {
    pub flag: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: &'static str,
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Self {
            registry: Registry::with_prefix("weir"),
            connections_active: Family::default(),
            connections_opened: Family::default(),
            connections_closed: Family::default(),
            connections_refused: Family::default(),
            protocol_errors: Family::default(),
            messages_received: Family::default(),
            records_decoded: Counter::default(),
            records_dead_lettered: Family::default(),
            records_enqueued: Counter::default(),
            records_dropped: Family::default(),
            records_committed: Counter::default(),
            records_duplicate: Counter::default(),
            dead_letters_committed: Counter::default(),
            records_failed: Counter::default(),
            shard_records: Family::default(),
            shard_bytes: Family::default(),
            sink_batch_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            sink_batch_records: Histogram::new(exponential_buckets(1.0, 2.0, 17)),
            sink_errors: Family::default(),
            sink_ready: Gauge::default(),
            sink_connected: Gauge::default(),
            sink_in_flight_records: Gauge::default(),
            kafka_queue_messages: Gauge::default(),
            kafka_errors: Family::default(),
            kafka_dead_lettered: Family::default(),
            kafka_producer_rebuilds: Counter::default(),
            buffer_bytes: Gauge::default(),
            buffer_unacked_records: Gauge::default(),
            buffer_appended_records: Counter::default(),
            buffer_replayed_records: Counter::default(),
            buffer_read_records: Family::default(),
            buffer_corruptions: Counter::default(),
            buffer_lost_records: Counter::default(),
            buffer_full: Family::default(),
            buffer_waiting: Gauge::default(),
            buffer_errors: Family::default(),
            buffer_fsync_seconds: Histogram::new(exponential_buckets(0.00005, 2.0, 18)),
            mqtt_sessions: Gauge::default(),
            mqtt_sessions_resumed: Counter::default(),
            mqtt_sessions_expired: Counter::default(),
            mqtt_sessions_refused: Family::default(),
            mqtt_sessions_taken_over: Counter::default(),
            mqtt_session_store_transactions: Counter::default(),
            mqtt_session_store_requests: Counter::default(),
            mqtt_session_store_pending: Gauge::default(),
            mqtt_session_store_commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            mqtt_session_store_errors: Counter::default(),
            tls_handshakes: Family::default(),
            tls_handshake_failures: Family::default(),
            tls_reloads: Family::default(),
            auth_successes: Family::default(),
            auth_failures: Family::default(),
            auth_rate_limited: Family::default(),
            auth_reloads: Family::default(),
            acl_denied: Family::default(),
            throttled: Family::default(),
            throttled_seconds: Family::default(),
            config_reloads: Family::default(),
            source_devices: Gauge::default(),
            source_devices_flagged: Family::default(),
            source_devices_seen: Counter::default(),
            source_devices_evicted: Counter::default(),
            source_seq_missing: Counter::default(),
            source_duplicates: Counter::default(),
            source_reorders: Counter::default(),
            source_seq_restarts: Counter::default(),
            source_schema_changes: Counter::default(),
        };
        let r = &mut m.registry;
        r.register("connections_active", "Open device connections", m.connections_active.clone());
        r.register("connections_opened", "Device connections accepted", m.connections_opened.clone());
        r.register("tls_handshakes", "TLS handshakes completed, by listener", m.tls_handshakes.clone());
        r.register(
            "tls_handshake_failures",
            "TLS handshakes failed or timed out, by listener and reason (the connection was closed)",
            m.tls_handshake_failures.clone(),
        );
        r.register(
            "tls_reloads",
            "TLS certificate reloads (SIGHUP), by result; on error the previous certificates stay",
            m.tls_reloads.clone(),
        );
        r.register(
            "auth_successes",
            "Devices authenticated (password file or JWT), by protocol",
            m.auth_successes.clone(),
        );
        r.register(
            "auth_failures",
            "Failed device authentications, by protocol and reason (the connection was refused)",
            m.auth_failures.clone(),
        );
        r.register(
            "auth_rate_limited",
            "Authentications refused unchecked: too many failures from the source address",
            m.auth_rate_limited.clone(),
        );
        r.register(
            "auth_reloads",
            "Password file reloads (SIGHUP), by result; on error the previous users stay",
            m.auth_reloads.clone(),
        );
        r.register(
            "acl_denied",
            "Messages refused by the publish ACL (or naming another device than the authenticated one), by protocol",
            m.acl_denied.clone(),
        );
        r.register(
            "throttled",
            "Times a device connection went over its message or byte rate and was paused (not read; nothing dropped), by protocol and reason (messages | bytes)",
            m.throttled.clone(),
        );
        r.register(
            "throttled_seconds",
            "Time device connections spent paused for being over their rate, by protocol",
            m.throttled_seconds.clone(),
        );
        r.register(
            "config_reloads",
            "Config reloads (SIGHUP), by result: ok, partial (some changes need a restart or were rejected), error (the file did not load; nothing changed)",
            m.config_reloads.clone(),
        );
        r.register("devices", "Devices in the source table (/api/devices)", m.source_devices.clone());
        r.register(
            "devices_flagged",
            "Devices in the source table by flag: silent, gaps, schema_changed (within the hour), skewed (clock), dead_letters",
            m.source_devices_flagged.clone(),
        );
        r.register(
            "devices_seen",
            "Devices added to the source table (new, or back after eviction)",
            m.source_devices_seen.clone(),
        );
        r.register(
            "devices_evicted",
            "Devices dropped from the full source table, least recently seen first ([sources] max_devices)",
            m.source_devices_evicted.clone(),
        );
        r.register(
            "device_seq_missing",
            "Records devices numbered but never sent (sequence gaps: lost before weir); late arrivals are taken back off the devices' gap counts",
            m.source_seq_missing.clone(),
        );
        r.register(
            "device_duplicates",
            "Records with a sequence number the device already sent (resends)",
            m.source_duplicates.clone(),
        );
        r.register(
            "device_reorders",
            "Records that arrived after a higher sequence number of their device",
            m.source_reorders.clone(),
        );
        r.register(
            "device_seq_restarts",
            "Devices that started counting their sequence again (reboots)",
            m.source_seq_restarts.clone(),
        );
        r.register(
            "device_schema_changes",
            "Changes of a device's payload schema (metric names, value kinds, tag names)",
            m.source_schema_changes.clone(),
        );
        r.register(
            "connections_closed",
            "Device connections closed, by reason",
            m.connections_closed.clone(),
        );
        r.register(
            "connections_refused",
            "Connections refused at accept by admission control, by reason (rate, per_ip)",
            m.connections_refused.clone(),
        );
        r.register(
            "protocol_errors",
            "Malformed or forbidden input from devices, by reason",
            m.protocol_errors.clone(),
        );
        r.register(
            "messages_received",
            "Device messages received (before decoding)",
            m.messages_received.clone(),
        );
        r.register("records_decoded", "Records decoded from device messages", m.records_decoded.clone());
        r.register(
            "records_dead_lettered",
            "Messages routed to the dead-letter table, by reason",
            m.records_dead_lettered.clone(),
        );
        r.register(
            "records_enqueued",
            "Records and dead letters that entered the fabric",
            m.records_enqueued.clone(),
        );
        r.register("records_dropped", "Records dropped, by reason", m.records_dropped.clone());
        r.register(
            "records_committed",
            "Records the sink committed (duplicates included)",
            m.records_committed.clone(),
        );
        r.register(
            "records_duplicate",
            "Committed records the sink already had (same device_id and seq)",
            m.records_duplicate.clone(),
        );
        r.register(
            "dead_letters_committed",
            "Dead letters the sink committed",
            m.dead_letters_committed.clone(),
        );
        r.register(
            "records_failed",
            "Records the sink could not store; their devices were not acked",
            m.records_failed.clone(),
        );
        r.register(
            "fabric_shard_records",
            "Records in a shard between enqueue and commit",
            m.shard_records.clone(),
        );
        r.register(
            "fabric_shard_bytes",
            "Record bytes in a shard between enqueue and commit",
            m.shard_bytes.clone(),
        );
        r.register(
            "sink_batch_duration_seconds",
            "Time to write and commit one batch, retries included",
            m.sink_batch_seconds.clone(),
        );
        r.register("sink_batch_records", "Records per committed batch", m.sink_batch_records.clone());
        r.register("sink_errors", "Sink write errors, by kind", m.sink_errors.clone());
        r.register(
            "sink_ready",
            "1 while the sink accepts batches, 0 while it is failing",
            m.sink_ready.clone(),
        );
        r.register(
            "sink_connected",
            "1 while the sink reaches its server (Kafka: a broker is up)",
            m.sink_connected.clone(),
        );
        r.register(
            "sink_in_flight_records",
            "Records handed to the sink and not yet committed",
            m.sink_in_flight_records.clone(),
        );
        r.register(
            "kafka_queue_messages",
            "Messages in librdkafka's producer queue (from its statistics)",
            m.kafka_queue_messages.clone(),
        );
        r.register("kafka_errors", "Kafka client and delivery errors, by kind", m.kafka_errors.clone());
        r.register(
            "kafka_dead_lettered",
            "Records sent to the Kafka dead-letter topic, by reason",
            m.kafka_dead_lettered.clone(),
        );
        r.register(
            "kafka_producer_rebuilds",
            "Producers rebuilt after a fatal error",
            m.kafka_producer_rebuilds.clone(),
        );
        r.register("buffer_bytes", "Bytes the disk buffer takes on disk", m.buffer_bytes.clone());
        r.register(
            "buffer_unacked_records",
            "Disk buffer entries not acknowledged in the log: what a restart would replay (the sink has not committed them, or its commit is not recorded yet, at most 100 ms)",
            m.buffer_unacked_records.clone(),
        );
        r.register(
            "buffer_appended_records",
            "Records and dead letters appended to the disk buffer",
            m.buffer_appended_records.clone(),
        );
        r.register(
            "buffer_replayed_records",
            "Disk buffer entries found unacknowledged at start, replayed before new records",
            m.buffer_replayed_records.clone(),
        );
        r.register(
            "buffer_read_records",
            "Records handed from the disk buffer to the sink: straight from memory, or read back from disk",
            m.buffer_read_records.clone(),
        );
        r.register(
            "buffer_corruptions",
            "Damaged regions found in the disk buffer (reported, skipped)",
            m.buffer_corruptions.clone(),
        );
        r.register(
            "buffer_lost_records",
            "Disk buffer entries lost to damage (where the count is known)",
            m.buffer_lost_records.clone(),
        );
        r.register(
            "buffer_full",
            "Times appending to the disk buffer had to wait for room, by reason",
            m.buffer_full.clone(),
        );
        r.register(
            "buffer_waiting",
            "1 while the disk buffer waits for room (devices are held back)",
            m.buffer_waiting.clone(),
        );
        r.register("buffer_errors", "Disk buffer I/O errors, by kind", m.buffer_errors.clone());
        r.register(
            "buffer_fsync_duration_seconds",
            "Time of one disk buffer fsync",
            m.buffer_fsync_seconds.clone(),
        );
        r.register("mqtt_sessions", "MQTT persistent sessions stored", m.mqtt_sessions.clone());
        r.register(
            "mqtt_sessions_resumed",
            "MQTT connections that resumed a stored session (CONNACK Session Present = 1)",
            m.mqtt_sessions_resumed.clone(),
        );
        r.register(
            "mqtt_sessions_expired",
            "MQTT sessions removed because their expiry interval passed after the disconnect",
            m.mqtt_sessions_expired.clone(),
        );
        r.register(
            "mqtt_sessions_refused",
            "Persistent MQTT sessions refused at CONNECT, by reason (max_sessions, store_failed)",
            m.mqtt_sessions_refused.clone(),
        );
        r.register(
            "mqtt_sessions_taken_over",
            "MQTT connections closed because a new connection used their client id",
            m.mqtt_sessions_taken_over.clone(),
        );
        r.register(
            "mqtt_session_store_transactions",
            "Transactions committed by the session store (each holds many requests)",
            m.mqtt_session_store_transactions.clone(),
        );
        r.register(
            "mqtt_session_store_requests",
            "Connects and disconnects recorded by the session store",
            m.mqtt_session_store_requests.clone(),
        );
        r.register(
            "mqtt_session_store_pending",
            "Requests sent to the session store and not yet committed (connects wait for their CONNACK)",
            m.mqtt_session_store_pending.clone(),
        );
        r.register(
            "mqtt_session_store_commit_duration_seconds",
            "Time to apply and commit one session store transaction",
            m.mqtt_session_store_commit_seconds.clone(),
        );
        r.register(
            "mqtt_session_store_errors",
            "Session store transactions that failed (rolled back)",
            m.mqtt_session_store_errors.clone(),
        );
        m
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
