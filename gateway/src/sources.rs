//! Source awareness: what each device is doing, learned from what it sends.
//!
//! Every batch a shard's batcher closes is observed here before it goes on to the sink: per
//! device, first and last seen, message, record and byte counts and rates, the payload format
//! and a schema fingerprint (and when it last changed), sequence gaps (records the device
//! numbered but never sent: lost before weir), duplicates, reorders and sequence restarts, the
//! device clock's skew against weir's receive time, and dead letters with the last error.
//!
//! A device's records all go to one shard, so each shard keeps its own table, locked once per
//! batch by its batcher and briefly by `/api/devices`. Each table is capped at its share of
//! `[sources] max_devices`; when full, the least recently seen tenth is evicted (counted).
//! Gaps, restarts and schema changes are logged once each (rate-limited).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use weir_proto::{metric_value, Record, SourceProtocol};
use weir_protocols::payload::PayloadFormat;

use crate::config::SourcesConfig;
use crate::fabric::{Item, Payload};
use crate::metrics::Metrics;

/// Rates are exponentially decayed counters with this time constant: a steady device's rate
/// converges to its true rate, a silent one's decays to 0 within a minute.
const RATE_TAU_S: f64 = 10.0;
/// Sequence numbers remembered below the highest one, to tell a late record (reorder) from a
/// resent one (duplicate).
const SEQ_WINDOW: u64 = 64;
/// A sequence number this small far below the highest seen is taken as the device starting
/// over (a reboot), not as a very late record.
const SEQ_RESTART_BELOW: u64 = 16;
/// Longest last error kept per device.
const MAX_ERROR_LEN: usize = 200;
/// A schema change within this long marks a device as changed.
const RECENT_CHANGE_MS: i64 = 3_600_000;

/// What a connection knows about one message that the records decoded from it do not carry:
/// set on the message's first item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageMeta {
    /// Payload bytes as received.
    pub bytes: u32,
    /// The decoder used (`Auto` resolved); `Auto` where it is unknown (a message too large to
    /// read).
    pub format: PayloadFormat,
}

impl MessageMeta {
    pub fn new(payload: &[u8], format: PayloadFormat) -> Self {
        let format = weir_protocols::payload::resolve_format(format, payload);
        Self { bytes: u32::try_from(payload.len()).unwrap_or(u32::MAX), format }
    }
}

/// Per-device sequence tracking.
#[derive(Debug, Default, Clone)]
struct SeqTracker {
    /// Highest sequence number seen; `None` before the first.
    highest: Option<u64>,
    /// Bit i set: `highest - 1 - i` was seen.
    below: u64,
    /// Records numbered but not (yet) received.
    gaps: u64,
    duplicates: u64,
    reorders: u64,
    restarts: u64,
}

/// What one sequence number told.
#[derive(Debug, PartialEq, Eq)]
enum SeqEvent {
    InOrder,
    /// `missing` numbers were skipped, the first of them `from`.
    Gap {
        from: u64,
        missing: u64,
    },
    Duplicate,
    Reorder,
    /// The device started counting again (from `seq`, after `highest`).
    Restart {
        highest: u64,
    },
}

impl SeqTracker {
    fn observe(&mut self, seq: u64) -> SeqEvent {
        let Some(highest) = self.highest else {
            self.highest = Some(seq);
            return SeqEvent::InOrder;
        };
        if seq > highest {
            let step = seq - highest;
            // The old highest joins the window, the skipped numbers enter it unseen.
            self.below = if step > SEQ_WINDOW { 0 } else { (self.below << step) | (1 << (step - 1)) };
            self.highest = Some(seq);
            if step > 1 {
                self.gaps += step - 1;
                return SeqEvent::Gap { from: highest + 1, missing: step - 1 };
            }
            return SeqEvent::InOrder;
        }
        if seq == highest {
            self.duplicates += 1;
            return SeqEvent::Duplicate;
        }
        let back = highest - seq;
        if back <= SEQ_WINDOW {
            let bit = 1 << (back - 1);
            if self.below & bit != 0 {
                self.duplicates += 1;
                return SeqEvent::Duplicate;
            }
            self.below |= bit;
            self.reorders += 1;
            self.gaps = self.gaps.saturating_sub(1);
            return SeqEvent::Reorder;
        }
        if seq < SEQ_RESTART_BELOW {
            self.restarts += 1;
            self.highest = Some(seq);
            self.below = 0;
            return SeqEvent::Restart { highest };
        }
        // Too far back to tell: almost always a resend.
        self.duplicates += 1;
        SeqEvent::Duplicate
    }
}

#[derive(Debug, Clone)]
struct Device {
    protocol: SourceProtocol,
    /// The last topic, path or listener it sent on. (`Box<str>` here and in `last_error`, not
    /// `String`: 16 bytes less per device, which puts `Device` in a smaller size class.)
    source: Box<str>,
    first_seen_ms: i64,
    last_seen_ms: i64,
    messages: u64,
    records: u64,
    bytes: u64,
    dead_letters: u64,
    last_error: Option<Box<str>>,
    /// Decayed counters (per second), as of `rates_at_ms`.
    message_rate: f64,
    byte_rate: f64,
    rates_at_ms: i64,
    /// Smoothed time between messages, for telling silence from a slow device.
    interval_ms: f64,
    format: Option<PayloadFormat>,
    schema: u64,
    schema_changes: u64,
    schema_changed_ms: Option<i64>,
    seq: SeqTracker,
    /// Smoothed receive time minus device time (positive: the device's clock is behind, or the
    /// message was late).
    skew_ms: Option<f64>,
}

impl Device {
    fn new(protocol: SourceProtocol, source: &str, now_ms: i64) -> Self {
        Self {
            protocol,
            source: source.into(),
            first_seen_ms: now_ms,
            last_seen_ms: now_ms,
            messages: 0,
            records: 0,
            bytes: 0,
            dead_letters: 0,
            last_error: None,
            message_rate: 0.0,
            byte_rate: 0.0,
            rates_at_ms: now_ms,
            interval_ms: 0.0,
            format: None,
            schema: 0,
            schema_changes: 0,
            schema_changed_ms: None,
            seq: SeqTracker::default(),
            skew_ms: None,
        }
    }

    fn decay_rates(&mut self, now_ms: i64) {
        (self.message_rate, self.byte_rate) = self.rates_at(now_ms);
        self.rates_at_ms = now_ms.max(self.rates_at_ms);
    }

    /// The message and byte rates as of `now_ms` (decayed since the last message), without
    /// changing anything.
    fn rates_at(&self, now_ms: i64) -> (f64, f64) {
        // A batch's records share one time: decay once per device and batch, not per record.
        if now_ms <= self.rates_at_ms {
            return (self.message_rate, self.byte_rate);
        }
        let dt = (now_ms - self.rates_at_ms) as f64 / 1000.0;
        let factor = (-dt / RATE_TAU_S).exp();
        (self.message_rate * factor, self.byte_rate * factor)
    }

    fn on_message(&mut self, meta: MessageMeta, now_ms: i64) {
        if self.messages > 0 {
            let gap = (now_ms - self.last_seen_ms).max(0) as f64;
            self.interval_ms = if self.messages == 1 { gap } else { 0.8 * self.interval_ms + 0.2 * gap };
        }
        self.messages += 1;
        self.bytes += u64::from(meta.bytes);
        self.decay_rates(now_ms);
        self.message_rate += 1.0 / RATE_TAU_S;
        self.byte_rate += f64::from(meta.bytes) / RATE_TAU_S;
        if meta.format != PayloadFormat::Auto {
            self.format = Some(meta.format);
        }
    }

    fn flags(&self, now_ms: i64, silence_min_ms: i64, skew_warn_ms: f64) -> Flags {
        let idle = now_ms - self.last_seen_ms;
        Flags {
            silent: idle > silence_min_ms.max((5.0 * self.interval_ms) as i64),
            gaps: self.seq.gaps > 0,
            schema_changed: self.schema_changed_ms.is_some_and(|at| now_ms - at < RECENT_CHANGE_MS),
            skewed: self.skew_ms.is_some_and(|s| s.abs() > skew_warn_ms),
            dead_letters: self.dead_letters > 0,
        }
    }
}

/// A record's shape: its metric names with their value kinds, and its tag names. Independent
/// of order (the maps are unordered).
fn schema_fingerprint(record: &Record) -> u64 {
    let mut sum = 0u64;
    for (name, value) in &record.metrics {
        let kind = match value.kind {
            Some(metric_value::Kind::Number(_)) => 1u8,
            Some(metric_value::Kind::Flag(_)) => 2,
            Some(metric_value::Kind::Text(_)) => 3,
            None => 0,
        };
        sum = sum.wrapping_add(fnv1a(kind, name.as_bytes()));
    }
    for name in record.tags.keys() {
        sum = sum.wrapping_add(fnv1a(4, name.as_bytes()));
    }
    // Never 0, which means "none yet".
    sum | 1
}

/// FNV-1a of `tag` then `bytes`, finished with a multiply-xorshift so the wrapping sum of many
/// names stays well mixed. Not keyed: a fingerprint is the device's own shape, nothing an
/// attacker gains from colliding (and it must compare equal across shards and restarts). Per
/// record on the batcher's path, so cheap: short metric names, no per-call setup.
fn fnv1a(tag: u8, bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for &byte in std::iter::once(&tag).chain(bytes) {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^= hash >> 32;
    hash = hash.wrapping_mul(0xd6e8_feb8_6659_fd93);
    hash ^ (hash >> 32)
}

struct Table {
    /// Boxed: a table at or past half its buckets' load (after each doubling) would otherwise
    /// spend a whole `Device` on every empty bucket; a pointer there costs 8 bytes
    /// (`load-tests/idle.sh`: 15,000 MQTT devices, ~250 bytes less per device).
    devices: HashMap<Arc<str>, Box<Device>>,
    capacity: usize,
}

/// Every shard's device table.
pub struct Sources {
    tables: Box<[Mutex<Table>]>,
    config: SourcesConfig,
    metrics: Arc<Metrics>,
    evicted: AtomicU64,
}

impl Sources {
    pub fn new(shards: usize, config: SourcesConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        let shards = shards.max(1);
        let capacity = config.max_devices.div_ceil(shards).max(1);
        let tables = (0..shards).map(|_| Mutex::new(Table { devices: HashMap::new(), capacity })).collect();
        Arc::new(Self { tables, config, metrics, evicted: AtomicU64::new(0) })
    }

    /// Records what one batch of shard `shard` tells about its devices.
    pub fn observe(&self, shard: usize, items: &[Item], now_ms: i64) {
        let Some(table) = self.tables.get(shard) else { return };
        let mut table = table.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for item in items {
            let (device_id, protocol, source) = match &item.payload {
                Payload::Record(r) => (r.device_id.as_str(), r.protocol(), r.source.as_str()),
                Payload::DeadLetter(d) => (d.device_id.as_str(), d.protocol, d.source.as_str()),
            };
            // One lookup for a known device (the common case), three for a new one.
            if let Some(device) = table.devices.get_mut(device_id) {
                self.observe_item(device_id, device, item, protocol, source, now_ms);
                continue;
            }
            if table.devices.len() >= table.capacity {
                self.evict_oldest(&mut table);
            }
            self.metrics.source_devices_seen.inc();
            table.devices.insert(Arc::from(device_id), Box::new(Device::new(protocol, source, now_ms)));
            if let Some(device) = table.devices.get_mut(device_id) {
                self.observe_item(device_id, device, item, protocol, source, now_ms);
            }
        }
    }

    fn observe_item(
        &self,
        device_id: &str,
        device: &mut Device,
        item: &Item,
        protocol: SourceProtocol,
        source: &str,
        now_ms: i64,
    ) {
        device.last_seen_ms = device.last_seen_ms.max(now_ms);
        device.protocol = protocol;
        if *device.source != *source {
            device.source = source.into();
        }
        if let Some(meta) = item.message {
            device.on_message(meta, now_ms);
        }
        match &item.payload {
            Payload::Record(record) => self.observe_record(device_id, device, record),
            Payload::DeadLetter(letter) => {
                device.dead_letters += 1;
                let mut error = letter.error.clone();
                if error.len() > MAX_ERROR_LEN {
                    let cut = (0..=MAX_ERROR_LEN).rev().find(|&i| error.is_char_boundary(i)).unwrap_or(0);
                    error.truncate(cut);
                }
                device.last_error = Some(error.into_boxed_str());
            }
        }
    }

    fn observe_record(&self, device_id: &str, device: &mut Device, record: &Record) {
        device.records += 1;
        let m = &self.metrics;
        if let Some(seq) = record.seq {
            match device.seq.observe(seq) {
                SeqEvent::InOrder => {}
                SeqEvent::Gap { from, missing } => {
                    m.source_seq_missing.inc_by(missing);
                    if crate::logs::SOURCE_EVENTS.allow() {
                        tracing::info!(
                            device = device_id,
                            from,
                            missing,
                            "sequence gap: records the device numbered never arrived"
                        );
                    }
                }
                SeqEvent::Duplicate => {
                    m.source_duplicates.inc();
                }
                SeqEvent::Reorder => {
                    m.source_reorders.inc();
                }
                SeqEvent::Restart { highest } => {
                    m.source_seq_restarts.inc();
                    if crate::logs::SOURCE_EVENTS.allow() {
                        tracing::info!(
                            device = device_id,
                            seq,
                            after = highest,
                            "sequence restarted (device reboot?)"
                        );
                    }
                }
            }
        }
        let schema = schema_fingerprint(record);
        if device.schema != schema {
            if device.schema != 0 {
                device.schema_changes += 1;
                device.schema_changed_ms = Some(record.received_ts_ms);
                m.source_schema_changes.inc();
                if crate::logs::SOURCE_EVENTS.allow() {
                    let metrics: Vec<&str> = record.metrics.keys().map(String::as_str).collect();
                    tracing::info!(device = device_id, ?metrics, "payload schema changed");
                }
            }
            device.schema = schema;
        }
        if let Some(device_ts) = record.device_ts_ms {
            let skew = (record.received_ts_ms - device_ts) as f64;
            device.skew_ms = Some(match device.skew_ms {
                None => skew,
                Some(previous) => 0.8 * previous + 0.2 * skew,
            });
        }
    }

    /// Drops the least recently seen tenth of a full table (one scan per tenth of its capacity
    /// of new devices, not one per device).
    fn evict_oldest(&self, table: &mut Table) {
        let count = (table.capacity / 10).max(1);
        let mut seen: Vec<i64> = table.devices.values().map(|d| d.last_seen_ms).collect();
        let cut_index = count.min(seen.len()) - 1;
        let (_, &mut cutoff, _) = seen.select_nth_unstable(cut_index);
        let mut left = count;
        table.devices.retain(|_, d| {
            if left > 0 && d.last_seen_ms <= cutoff {
                left -= 1;
                false
            } else {
                true
            }
        });
        let evicted = (count - left) as u64;
        self.evicted.fetch_add(evicted, Ordering::Relaxed);
        self.metrics.source_devices_evicted.inc_by(evicted);
    }

    /// Devices matching `query`, sorted and paged, as of `now_ms`.
    pub fn query(&self, query: &DeviceQuery, now_ms: i64) -> DevicePage {
        let (silence_min_ms, skew_ms) = self.thresholds();
        let mut tracked = 0;
        let mut matching = Vec::new();
        for table in self.tables.iter() {
            let table = table.lock().unwrap_or_else(|p| p.into_inner());
            tracked += table.devices.len();
            for (id, device) in &table.devices {
                if !query.device.as_deref().is_none_or(|text| id.contains(text)) {
                    continue;
                }
                let view = DeviceView::of(id, device, now_ms, silence_min_ms, skew_ms);
                if query.filter.is_none_or(|filter| view.flags.has(filter)) {
                    matching.push(view);
                }
            }
        }
        let total = matching.len();
        query.sort.sort(&mut matching, query.descending);
        let devices: Vec<DeviceView> = matching.into_iter().skip(query.offset).take(query.limit).collect();
        DevicePage {
            tracked,
            total,
            offset: query.offset,
            limit: query.limit,
            evicted: self.evicted.load(Ordering::Relaxed),
            devices,
        }
    }

    /// Sets the fleet gauges (devices tracked, and how many are silent, have gaps, changed
    /// schema within the hour, have a skewed clock, sent dead letters); called periodically.
    pub fn update_gauges(&self, now_ms: i64) {
        let (silence_min_ms, skew_ms) = self.thresholds();
        let mut tracked = 0;
        let mut counts = [0i64; Filter::ALL.len()];
        for table in self.tables.iter() {
            let table = table.lock().unwrap_or_else(|p| p.into_inner());
            tracked += table.devices.len();
            for device in table.devices.values() {
                let flags = device.flags(now_ms, silence_min_ms, skew_ms);
                for (count, filter) in counts.iter_mut().zip(Filter::ALL) {
                    *count += i64::from(flags.has(filter));
                }
            }
        }
        let m = &self.metrics;
        m.source_devices.set(tracked as i64);
        for (filter, count) in Filter::ALL.into_iter().zip(counts) {
            m.source_devices_flagged
                .get_or_create(&crate::metrics::FlagLabel { flag: filter.label() })
                .set(count);
        }
    }

    fn thresholds(&self) -> (i64, f64) {
        let silence_min_ms =
            i64::try_from(self.config.silence_min_s.saturating_mul(1000)).unwrap_or(i64::MAX);
        (silence_min_ms, self.config.clock_skew_warn_ms as f64)
    }
}

/// Refreshes the fleet gauges every few seconds until shutdown.
pub async fn update_gauges_until(sources: Arc<Sources>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => sources.update_gauges(crate::listener::ingest::now_ms()),
            _ = crate::shutdown::signalled(&mut shutdown) => return,
        }
    }
}

/// A device's state flags, what the dashboard highlights.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Flags {
    /// Sent nothing for longer than `silence_min_s` and five of its usual intervals.
    pub silent: bool,
    /// Has sequence gaps (records numbered but never received).
    pub gaps: bool,
    /// Its payload schema changed within the last hour.
    pub schema_changed: bool,
    /// Its clock is off from weir's by more than `clock_skew_warn_ms`.
    pub skewed: bool,
    /// Sent payloads that could not be decoded.
    pub dead_letters: bool,
}

/// `?filter=`: devices with one flag set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Silent,
    Gaps,
    SchemaChanged,
    Skewed,
    DeadLetters,
}

impl Filter {
    const ALL: [Filter; 5] =
        [Filter::Silent, Filter::Gaps, Filter::SchemaChanged, Filter::Skewed, Filter::DeadLetters];

    pub fn label(self) -> &'static str {
        match self {
            Filter::Silent => "silent",
            Filter::Gaps => "gaps",
            Filter::SchemaChanged => "schema_changed",
            Filter::Skewed => "skewed",
            Filter::DeadLetters => "dead_letters",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.label() == text)
    }
}

impl Flags {
    fn has(&self, filter: Filter) -> bool {
        match filter {
            Filter::Silent => self.silent,
            Filter::Gaps => self.gaps,
            Filter::SchemaChanged => self.schema_changed,
            Filter::Skewed => self.skewed,
            Filter::DeadLetters => self.dead_letters,
        }
    }
}

/// `?sort=`: what the page is ordered by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortKey {
    #[default]
    Device,
    LastSeen,
    FirstSeen,
    Messages,
    MessageRate,
    ByteRate,
    Gaps,
    Duplicates,
    DeadLetters,
    Skew,
    SchemaChanges,
}

impl SortKey {
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "device" | "device_id" => SortKey::Device,
            "last_seen" => SortKey::LastSeen,
            "first_seen" => SortKey::FirstSeen,
            "messages" => SortKey::Messages,
            "message_rate" | "rate" => SortKey::MessageRate,
            "byte_rate" => SortKey::ByteRate,
            "gaps" => SortKey::Gaps,
            "duplicates" => SortKey::Duplicates,
            "dead_letters" => SortKey::DeadLetters,
            "skew" => SortKey::Skew,
            "schema_changes" => SortKey::SchemaChanges,
            _ => return None,
        })
    }

    fn compare(self, a: &DeviceView, b: &DeviceView) -> std::cmp::Ordering {
        match self {
            SortKey::Device => a.device_id.cmp(&b.device_id),
            SortKey::LastSeen => a.last_seen_ms.cmp(&b.last_seen_ms),
            SortKey::FirstSeen => a.first_seen_ms.cmp(&b.first_seen_ms),
            SortKey::Messages => a.messages.cmp(&b.messages),
            SortKey::MessageRate => a.messages_per_s.total_cmp(&b.messages_per_s),
            SortKey::ByteRate => a.bytes_per_s.total_cmp(&b.bytes_per_s),
            SortKey::Gaps => a.seq.gaps.cmp(&b.seq.gaps),
            SortKey::Duplicates => a.seq.duplicates.cmp(&b.seq.duplicates),
            SortKey::DeadLetters => a.dead_letters.cmp(&b.dead_letters),
            SortKey::Skew => {
                let skew = |v: &DeviceView| v.clock_skew_ms.map_or(0.0, f64::abs);
                skew(a).total_cmp(&skew(b))
            }
            SortKey::SchemaChanges => a.schema_changes.cmp(&b.schema_changes),
        }
    }

    fn sort(self, views: &mut [DeviceView], descending: bool) {
        // Ties in device id order, so pages are stable.
        views.sort_by(|a, b| {
            let ordering = self.compare(a, b);
            let ordering = if descending { ordering.reverse() } else { ordering };
            ordering.then_with(|| a.device_id.cmp(&b.device_id))
        });
    }
}

/// `/api/devices` parameters.
#[derive(Debug, Clone)]
pub struct DeviceQuery {
    pub offset: usize,
    pub limit: usize,
    pub sort: SortKey,
    pub descending: bool,
    pub filter: Option<Filter>,
    /// Only devices whose id contains this.
    pub device: Option<String>,
}

impl Default for DeviceQuery {
    fn default() -> Self {
        Self { offset: 0, limit: 100, sort: SortKey::Device, descending: false, filter: None, device: None }
    }
}

impl DeviceQuery {
    /// Most devices one page returns.
    pub const MAX_LIMIT: usize = 1000;
}

#[derive(Debug, Serialize)]
pub struct DevicePage {
    /// Devices in the table.
    pub tracked: usize,
    /// Devices matching the filter.
    pub total: usize,
    pub offset: usize,
    pub limit: usize,
    /// Devices dropped from the table since start (it was full).
    pub evicted: u64,
    pub devices: Vec<DeviceView>,
}

#[derive(Debug, Serialize)]
pub struct SeqView {
    pub highest: Option<u64>,
    pub gaps: u64,
    pub duplicates: u64,
    pub reorders: u64,
    pub restarts: u64,
}

/// One device as `/api/devices` shows it.
#[derive(Debug, Serialize)]
pub struct DeviceView {
    pub device_id: String,
    pub protocol: &'static str,
    pub source: String,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub messages: u64,
    pub records: u64,
    pub bytes: u64,
    pub messages_per_s: f64,
    pub bytes_per_s: f64,
    pub format: Option<&'static str>,
    /// Hex fingerprint of the metric names, value kinds and tag names last seen.
    pub schema: String,
    pub schema_changes: u64,
    pub schema_changed_ms: Option<i64>,
    pub seq: SeqView,
    /// Receive time minus device time, smoothed (ms).
    pub clock_skew_ms: Option<f64>,
    pub dead_letters: u64,
    pub last_error: Option<String>,
    pub flags: Flags,
}

impl DeviceView {
    fn of(id: &str, d: &Device, now_ms: i64, silence_min_ms: i64, skew_warn_ms: f64) -> Self {
        let (message_rate, byte_rate) = d.rates_at(now_ms);
        let flags = d.flags(now_ms, silence_min_ms, skew_warn_ms);
        Self {
            device_id: id.to_owned(),
            protocol: protocol_label(d.protocol),
            source: d.source.to_string(),
            first_seen_ms: d.first_seen_ms,
            last_seen_ms: d.last_seen_ms,
            messages: d.messages,
            records: d.records,
            bytes: d.bytes,
            messages_per_s: round2(message_rate),
            bytes_per_s: round2(byte_rate),
            format: d.format.map(|f| match f {
                PayloadFormat::Json => "json",
                PayloadFormat::Protobuf => "protobuf",
                PayloadFormat::Auto => "auto",
            }),
            schema: format!("{:016x}", d.schema),
            schema_changes: d.schema_changes,
            schema_changed_ms: d.schema_changed_ms,
            seq: SeqView {
                highest: d.seq.highest,
                gaps: d.seq.gaps,
                duplicates: d.seq.duplicates,
                reorders: d.seq.reorders,
                restarts: d.seq.restarts,
            },
            clock_skew_ms: d.skew_ms.map(|s| s.round()),
            dead_letters: d.dead_letters,
            last_error: d.last_error.as_deref().map(str::to_owned),
            flags,
        }
    }
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

fn protocol_label(protocol: SourceProtocol) -> &'static str {
    match protocol {
        SourceProtocol::Mqtt => "mqtt",
        SourceProtocol::MqttWs => "mqtt_ws",
        SourceProtocol::Websocket => "ws",
        SourceProtocol::Http => "http",
        SourceProtocol::Tcp => "tcp",
        SourceProtocol::MqttBridge => "mqtt_bridge",
        SourceProtocol::Unspecified => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fabric::DeadLetter;
    use weir_proto::MetricValue;

    fn record(
        device: &str,
        seq: Option<u64>,
        metrics: &[&str],
        received: i64,
        device_ts: Option<i64>,
    ) -> Item {
        let metrics = metrics
            .iter()
            .map(|name| (name.to_string(), MetricValue { kind: Some(metric_value::Kind::Number(1.0)) }))
            .collect();
        let record = Record {
            device_id: device.into(),
            seq,
            device_ts_ms: device_ts,
            received_ts_ms: received,
            protocol: SourceProtocol::Mqtt as i32,
            source: format!("devices/{device}"),
            metrics,
            ..Record::default()
        };
        let mut item = Item::record(record, None);
        item.message = Some(MessageMeta { bytes: 100, format: PayloadFormat::Json });
        item
    }

    fn sources(max_devices: usize) -> Arc<Sources> {
        let config = SourcesConfig { max_devices, ..SourcesConfig::default() };
        Sources::new(1, config, Arc::new(Metrics::new()))
    }

    fn view(sources: &Sources, device: &str, now_ms: i64) -> DeviceView {
        let query = DeviceQuery { device: Some(device.into()), ..DeviceQuery::default() };
        let mut page = sources.query(&query, now_ms);
        assert_eq!(page.devices.len(), 1, "{device}");
        page.devices.remove(0)
    }

    #[test]
    fn sequence_gaps_duplicates_reorders_and_restarts() {
        let mut seq = SeqTracker::default();
        let events: Vec<SeqEvent> =
            [1, 2, 3, 7, 5, 5, 3, 8, 200, 2, 3].into_iter().map(|s| seq.observe(s)).collect();
        assert_eq!(
            events,
            [
                SeqEvent::InOrder,
                SeqEvent::InOrder,
                SeqEvent::InOrder,
                SeqEvent::Gap { from: 4, missing: 3 },
                SeqEvent::Reorder,
                SeqEvent::Duplicate,
                SeqEvent::Duplicate,
                SeqEvent::InOrder,
                SeqEvent::Gap { from: 9, missing: 191 },
                SeqEvent::Restart { highest: 200 },
                SeqEvent::InOrder,
            ]
        );
        // 4 and 6 never came (5 did, late); 9..=199 never came.
        assert_eq!((seq.gaps, seq.duplicates, seq.reorders, seq.restarts), (2 + 191, 2, 1, 1));
    }

    #[test]
    fn a_late_record_beyond_the_window_counts_as_a_duplicate() {
        let mut seq = SeqTracker::default();
        for s in 100..300 {
            seq.observe(s);
        }
        assert_eq!(seq.observe(150), SeqEvent::Duplicate);
        assert_eq!(seq.observe(299 - SEQ_WINDOW), SeqEvent::Duplicate);
        assert_eq!(seq.gaps, 0);
    }

    #[test]
    fn a_device_is_described_by_what_it_sent() {
        let s = sources(100);
        let t0 = 1_700_000_000_000;
        let items: Vec<Item> = (1..=10)
            .filter(|&n| n != 4)
            .map(|n| {
                record(
                    "pump-1",
                    Some(n),
                    &["temp", "rpm"],
                    t0 + n as i64 * 1000,
                    Some(t0 + n as i64 * 1000 - 2500),
                )
            })
            .collect();
        s.observe(0, &items, t0 + 10_000);
        let v = view(&s, "pump-1", t0 + 10_000);
        assert_eq!((v.messages, v.records, v.bytes), (9, 9, 900));
        assert_eq!(v.seq.gaps, 1);
        assert_eq!(v.seq.highest, Some(10));
        assert_eq!(v.clock_skew_ms, Some(2500.0));
        assert_eq!(v.format, Some("json"));
        assert_eq!(v.schema_changes, 0);
        assert!(v.flags.gaps && !v.flags.silent && !v.flags.schema_changed && !v.flags.skewed);
        assert!(v.messages_per_s > 0.0);

        // A new metric: the schema changed (once), and the device is flagged for an hour.
        s.observe(
            0,
            &[record("pump-1", Some(11), &["temp", "rpm", "vibration"], t0 + 11_000, None)],
            t0 + 11_000,
        );
        let v = view(&s, "pump-1", t0 + 11_000);
        assert_eq!(v.schema_changes, 1);
        assert!(v.flags.schema_changed);
        assert!(!view(&s, "pump-1", t0 + 11_000 + RECENT_CHANGE_MS).flags.schema_changed);
        // The order of metrics is not a change.
        s.observe(
            0,
            &[record("pump-1", Some(12), &["vibration", "rpm", "temp"], t0 + 12_000, None)],
            t0 + 12_000,
        );
        assert_eq!(view(&s, "pump-1", t0 + 12_000).schema_changes, 1);

        // Silence: long past its usual one-second interval and the minimum.
        let later = t0 + 12_000 + 61_000;
        assert!(view(&s, "pump-1", later).flags.silent);
        assert_eq!(view(&s, "pump-1", later).messages_per_s, 0.0);
    }

    #[test]
    fn dead_letters_and_clock_skew_are_flagged() {
        let s = sources(100);
        let t0 = 1_700_000_000_000;
        let letter = DeadLetter {
            device_id: "valve-9".into(),
            protocol: SourceProtocol::Tcp,
            source: "tcp://x".into(),
            error: "é".repeat(300),
            raw: bytes::Bytes::from_static(b"garbage"),
            received_ts_ms: t0,
        };
        let mut item = Item::dead_letter(letter, None);
        item.message = Some(MessageMeta::new(b"garbage", PayloadFormat::Auto));
        s.observe(0, &[item, record("valve-9", Some(1), &["p"], t0, Some(t0 - 3_600_000))], t0);
        let v = view(&s, "valve-9", t0);
        assert_eq!((v.dead_letters, v.messages, v.records), (1, 2, 1));
        assert!(v.last_error.as_ref().is_some_and(|e| e.len() <= MAX_ERROR_LEN));
        assert!(v.flags.dead_letters && v.flags.skewed);
        let page = s.query(&DeviceQuery { filter: Some(Filter::Skewed), ..DeviceQuery::default() }, t0);
        assert_eq!(page.total, 1);
    }

    #[test]
    fn a_full_table_evicts_the_least_recently_seen() {
        let s = sources(20);
        let t0 = 1_700_000_000_000;
        for n in 0..20 {
            s.observe(0, &[record(&format!("d{n:02}"), Some(1), &["x"], t0 + n, None)], t0 + n);
        }
        s.observe(0, &[record("newcomer", Some(1), &["x"], t0 + 100, None)], t0 + 100);
        let page = s.query(&DeviceQuery { limit: 100, ..DeviceQuery::default() }, t0 + 100);
        assert_eq!(page.tracked, 19);
        assert_eq!(page.evicted, 2);
        let ids: Vec<&str> = page.devices.iter().map(|d| d.device_id.as_str()).collect();
        assert!(
            !ids.contains(&"d00")
                && !ids.contains(&"d01")
                && ids.contains(&"d02")
                && ids.contains(&"newcomer")
        );
    }

    #[test]
    fn pages_are_sorted_filtered_and_stable() {
        let s = sources(100);
        let t0 = 1_700_000_000_000;
        for n in 0..30u64 {
            let items: Vec<Item> = (1..=n + 1)
                .map(|seq| record(&format!("dev-{n:02}"), Some(seq * 2), &["x"], t0, None))
                .collect();
            s.observe(0, &items, t0);
        }
        let query = DeviceQuery {
            sort: SortKey::Messages,
            descending: true,
            limit: 5,
            offset: 5,
            ..DeviceQuery::default()
        };
        let page = s.query(&query, t0);
        assert_eq!((page.total, page.tracked), (30, 30));
        let ids: Vec<&str> = page.devices.iter().map(|d| d.device_id.as_str()).collect();
        assert_eq!(ids, ["dev-24", "dev-23", "dev-22", "dev-21", "dev-20"]);
        // Every device but the one with a single message skipped odd numbers.
        let gappy = s.query(&DeviceQuery { filter: Some(Filter::Gaps), ..DeviceQuery::default() }, t0);
        assert_eq!(gappy.total, 29);
        let named = s.query(&DeviceQuery { device: Some("-1".into()), ..DeviceQuery::default() }, t0);
        assert_eq!(named.total, 10);
    }
}
