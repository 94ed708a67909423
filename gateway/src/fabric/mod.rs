//! The bounded channel fabric: records are routed to a shard by device id (so one device's
//! records stay in order), each shard bounded by records AND bytes from enqueue to commit.

mod batcher;

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use bytes::Bytes;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{Semaphore, TryAcquireError};
use weir_proto::{Record, SourceProtocol};
use weir_protocols::mqtt::session::Outcome;

pub use batcher::{run_batcher, Batch, BatchLimits};

use crate::ack::AckToken;
use crate::config::WhenFull;
use crate::metrics::{Metrics, ReasonLabel, ShardLabel};
pub use crate::sources::MessageMeta;

/// A message that could not be decoded, kept with its raw bytes and the reason.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub device_id: String,
    pub protocol: SourceProtocol,
    pub source: String,
    pub error: String,
    pub raw: Bytes,
    pub received_ts_ms: i64,
}

#[derive(Debug)]
pub enum Payload {
    Record(Record),
    DeadLetter(DeadLetter),
}

/// What travels through the fabric: a record or a dead letter, and its share of the ack.
#[derive(Debug)]
pub struct Item {
    pub payload: Payload,
    pub ack: Option<AckToken>,
    /// Approximate memory held, counted against the shard's byte bound.
    pub bytes: usize,
    /// On a message's first item: the message's size and format (for source awareness).
    pub message: Option<MessageMeta>,
}

impl Item {
    pub fn record(record: Record, ack: Option<AckToken>) -> Self {
        let bytes = record_bytes(&record);
        Self { payload: Payload::Record(record), ack, bytes, message: None }
    }

    pub fn dead_letter(letter: DeadLetter, ack: Option<AckToken>) -> Self {
        let bytes =
            128 + letter.device_id.len() + letter.source.len() + letter.error.len() + letter.raw.len();
        Self { payload: Payload::DeadLetter(letter), ack, bytes, message: None }
    }

    pub fn device_id(&self) -> &str {
        match &self.payload {
            Payload::Record(r) => &r.device_id,
            Payload::DeadLetter(d) => &d.device_id,
        }
    }

    /// Marks this item as its message's first (`meta` describes the message).
    pub fn of_message(mut self, meta: MessageMeta) -> Self {
        self.message = Some(meta);
        self
    }

    /// Reports this item's outcome to its device connection, if it has one.
    pub fn settle(self, outcome: Outcome) {
        if let Some(ack) = self.ack {
            ack.settle(outcome);
        }
    }
}

fn record_bytes(r: &Record) -> usize {
    let metrics: usize = r.metrics.keys().map(|k| k.len() + 48).sum();
    let tags: usize = r.tags.iter().map(|(k, v)| k.len() + v.len() + 48).sum();
    128 + r.device_id.len() + r.source.len() + r.raw.len() + metrics + tags
}

/// Turns one message's decoded records (drained from `records`) into fabric items, each with
/// its share of the message's ack token: the message is acknowledged when its last record is.
pub fn message_items(
    records: &mut Vec<Record>,
    token: Option<AckToken>,
    meta: MessageMeta,
    items: &mut Vec<Item>,
) {
    let mut shares = token.map(|t| t.split(records.len()));
    items.reserve(records.len());
    let first = items.len();
    for record in records.drain(..) {
        let share = shares.as_mut().and_then(Vec::pop);
        items.push(Item::record(record, share));
    }
    if let Some(item) = items.get_mut(first) {
        item.message = Some(meta);
    }
}

/// The fabric is shutting down: the connection stops reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FabricClosed;

/// Why [`Fabric::send`] gave the item back.
#[derive(Debug)]
pub enum SendError {
    /// The shard was full and its policy is `drop_newest`. The caller counts and answers.
    Full(Item),
    /// The fabric is shutting down.
    Closed(Item),
}

/// The per-shard bound, held from enqueue until the batch holding the record is dropped
/// (after the sink committed it or gave up on it).
#[derive(Debug)]
pub struct Budget {
    records: Semaphore,
    bytes: Semaphore,
    max_bytes: usize,
    /// This shard's fill gauges, looked up once (a family lookup per record would cost a lock).
    records_gauge: Gauge,
    bytes_gauge: Gauge,
}

impl Budget {
    fn charge(&self, bytes: usize) -> usize {
        bytes.min(self.max_bytes)
    }

    /// Returns the room `records` records of `bytes` charged bytes held.
    pub fn release(&self, records: usize, bytes: usize) {
        self.records.add_permits(records);
        self.bytes.add_permits(bytes);
        self.records_gauge.dec_by(records as i64);
        self.bytes_gauge.dec_by(bytes as i64);
    }
}

#[derive(Debug, Clone)]
struct Shard {
    items_tx: flume::Sender<Item>,
    budget: Arc<Budget>,
}

/// The sending side of the fabric, cloned into every connection.
#[derive(Debug, Clone)]
pub struct Fabric {
    shards: Arc<[Shard]>,
    when_full: WhenFull,
    metrics: Arc<Metrics>,
}

/// The receiving side of one shard, consumed by its batcher.
pub struct ShardReceiver {
    pub items_rx: flume::Receiver<Item>,
    pub budget: Arc<Budget>,
}

impl Fabric {
    /// Builds `shards` shards of `max_records` records and `max_bytes` bytes each.
    pub fn new(
        shards: usize,
        max_records: usize,
        max_bytes: usize,
        when_full: WhenFull,
        metrics: Arc<Metrics>,
    ) -> (Self, Vec<ShardReceiver>) {
        let mut senders = Vec::with_capacity(shards);
        let mut receivers = Vec::with_capacity(shards);
        let max_records = max_records.min(Semaphore::MAX_PERMITS);
        let max_bytes = max_bytes.min(Semaphore::MAX_PERMITS);
        for shard in 0..shards {
            // Every shard shows on /metrics from the start, empty.
            let label = ShardLabel { shard: shard as u32 };
            let budget = Arc::new(Budget {
                records: Semaphore::new(max_records),
                bytes: Semaphore::new(max_bytes),
                max_bytes,
                records_gauge: metrics.shard_records.get_or_create(&label).clone(),
                bytes_gauge: metrics.shard_bytes.get_or_create(&label).clone(),
            });
            // The budget bounds the items in the fabric; the channel never holds more than it.
            let (items_tx, items_rx) = flume::bounded(max_records);
            senders.push(Shard { items_tx, budget: Arc::clone(&budget) });
            receivers.push(ShardReceiver { items_rx, budget });
        }
        (Self { shards: senders.into(), when_full, metrics }, receivers)
    }

    /// The shard a device's records go to.
    pub fn shard_of(&self, device_id: &str) -> usize {
        let mut hasher = DefaultHasher::new();
        device_id.hash(&mut hasher);
        (hasher.finish() % self.shards.len() as u64) as usize
    }

    /// Enqueues an item on its device's shard. Under `block` this waits for room (the caller
    /// stops reading its connection meanwhile); under `drop_newest` a full shard gives the item
    /// back as [`SendError::Full`].
    pub async fn send(&self, item: Item) -> Result<(), SendError> {
        self.send_with(item, self.when_full).await
    }

    /// Enqueues an item only if its shard has room now, whatever the policy; a full shard gives
    /// it back as [`SendError::Full`]. For callers that answer "busy" rather than wait (HTTP).
    pub async fn try_send(&self, item: Item) -> Result<(), SendError> {
        self.send_with(item, WhenFull::DropNewest).await
    }

    async fn send_with(&self, item: Item, when_full: WhenFull) -> Result<(), SendError> {
        let item = match self.try_send_now(item) {
            Err(SendError::Full(item)) if when_full == WhenFull::Block => item,
            done => return done,
        };
        let shard = &self.shards[self.shard_of(item.device_id())];
        let budget = &shard.budget;
        let charged = budget.charge(item.bytes);
        let Ok(records) = budget.records.acquire_many(1).await else {
            return Err(SendError::Closed(item));
        };
        let Ok(bytes) = budget.bytes.acquire_many(charged as u32).await else {
            return Err(SendError::Closed(item));
        };
        records.forget();
        bytes.forget();
        self.push(shard, item, charged)
    }

    /// What a connection makes of a finished [`Fabric::send`]: stored; dropped under
    /// `drop_newest` (counted, the item settled `Dropped`); or the fabric is closing (the item
    /// settled `Failed`, so its device is not acked).
    pub fn settle_send(&self, sent: Result<(), SendError>) -> Result<Outcome, FabricClosed> {
        match sent {
            Ok(()) => Ok(Outcome::Stored),
            Err(SendError::Full(item)) => {
                self.metrics.records_dropped.get_or_create(&ReasonLabel { reason: "fabric_full" }).inc();
                if crate::logs::DROPS.allow() {
                    tracing::warn!(
                        device = item.device_id(),
                        "fabric full (when_full = drop_newest): record dropped"
                    );
                }
                item.settle(Outcome::Dropped);
                Ok(Outcome::Dropped)
            }
            Err(SendError::Closed(item)) => {
                item.settle(Outcome::Failed);
                Err(FabricClosed)
            }
        }
    }

    /// Enqueues an item if its shard has room now, without waiting; a full shard gives it back
    /// as [`SendError::Full`] whatever the policy (the caller then waits with [`Fabric::send`]
    /// or answers busy). The hot path: no future, no allocation.
    // The error gives the item back by value: boxing it would cost an allocation per record.
    #[allow(clippy::result_large_err)]
    pub fn try_send_now(&self, item: Item) -> Result<(), SendError> {
        let shard = &self.shards[self.shard_of(item.device_id())];
        let budget = &shard.budget;
        let charged = budget.charge(item.bytes);
        let records = match budget.records.try_acquire_many(1) {
            Ok(permit) => permit,
            Err(TryAcquireError::NoPermits) => return Err(SendError::Full(item)),
            Err(TryAcquireError::Closed) => return Err(SendError::Closed(item)),
        };
        let bytes = match budget.bytes.try_acquire_many(charged as u32) {
            Ok(permit) => permit,
            Err(TryAcquireError::NoPermits) => return Err(SendError::Full(item)),
            Err(TryAcquireError::Closed) => return Err(SendError::Closed(item)),
        };
        records.forget();
        bytes.forget();
        self.push(shard, item, charged)
    }

    /// Puts an item whose budget is taken into its shard's channel. The budget bounds the items
    /// in the fabric, and the channel holds as many as the budget, so it always has room.
    #[allow(clippy::result_large_err)]
    fn push(&self, shard: &Shard, item: Item, charged: usize) -> Result<(), SendError> {
        let budget = &shard.budget;
        budget.records_gauge.inc();
        budget.bytes_gauge.inc_by(charged as i64);
        match shard.items_tx.try_send(item) {
            Ok(()) => {
                self.metrics.records_enqueued.inc();
                Ok(())
            }
            Err(flume::TrySendError::Full(item)) => {
                budget.release(1, charged);
                Err(SendError::Full(item))
            }
            Err(flume::TrySendError::Disconnected(item)) => {
                budget.release(1, charged);
                Err(SendError::Closed(item))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(device: &str) -> Item {
        Item::record(Record { device_id: device.into(), ..Record::default() }, None)
    }

    #[tokio::test]
    async fn drop_newest_gives_the_item_back_at_the_record_bound() {
        let (fabric, rx) = Fabric::new(1, 2, 1 << 20, WhenFull::DropNewest, Arc::new(Metrics::new()));
        fabric.send(item("a")).await.unwrap();
        fabric.send(item("a")).await.unwrap();
        assert!(matches!(fabric.send(item("a")).await, Err(SendError::Full(_))));
        // Room returns only when the records' budget is released (after the commit).
        let _ = rx[0].items_rx.try_recv().unwrap();
        assert!(matches!(fabric.send(item("a")).await, Err(SendError::Full(_))));
        rx[0].budget.release(1, rx[0].budget.charge(item("a").bytes));
        fabric.send(item("a")).await.unwrap();
    }

    #[tokio::test]
    async fn byte_bound_applies_as_well() {
        let bytes = item("a").bytes;
        let (fabric, _rx) = Fabric::new(1, 100, bytes * 2, WhenFull::DropNewest, Arc::new(Metrics::new()));
        fabric.send(item("a")).await.unwrap();
        fabric.send(item("a")).await.unwrap();
        assert!(matches!(fabric.send(item("a")).await, Err(SendError::Full(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn block_waits_for_room() {
        let (fabric, rx) = Fabric::new(1, 1, 1 << 20, WhenFull::Block, Arc::new(Metrics::new()));
        fabric.send(item("a")).await.unwrap();
        let blocked = tokio::spawn({
            let fabric = fabric.clone();
            async move { fabric.send(item("a")).await }
        });
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        assert!(!blocked.is_finished());
        let _ = rx[0].items_rx.try_recv().unwrap();
        rx[0].budget.release(1, rx[0].budget.charge(item("a").bytes));
        blocked.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn try_send_now_never_waits_and_keeps_the_bound() {
        let (fabric, rx) = Fabric::new(1, 2, 1 << 20, WhenFull::Block, Arc::new(Metrics::new()));
        fabric.try_send_now(item("a")).unwrap();
        fabric.try_send_now(item("a")).unwrap();
        assert!(matches!(fabric.try_send_now(item("a")), Err(SendError::Full(_))), "full under block too");
        assert_eq!(rx[0].items_rx.len(), 2);
        // Room returns when a batch that held a record is done with it.
        let _ = rx[0].items_rx.try_recv().unwrap();
        rx[0].budget.release(1, rx[0].budget.charge(item("a").bytes));
        fabric.try_send_now(item("a")).unwrap();
        assert!(matches!(fabric.try_send_now(item("a")), Err(SendError::Full(_))));
        // With the batchers gone (shutdown), an item with room is given back as closed.
        let (closing, rx) = Fabric::new(1, 2, 1 << 20, WhenFull::Block, Arc::new(Metrics::new()));
        drop(rx);
        assert!(matches!(closing.try_send_now(item("a")), Err(SendError::Closed(_))));
    }

    #[test]
    fn a_device_always_maps_to_the_same_shard() {
        let (fabric, _rx) = Fabric::new(8, 10, 1 << 20, WhenFull::Block, Arc::new(Metrics::new()));
        let shards: std::collections::HashSet<_> =
            (0..100).map(|i| fabric.shard_of(&format!("d{i}"))).collect();
        assert!(shards.len() > 1, "devices spread over shards");
        assert_eq!(fabric.shard_of("device-42"), fabric.shard_of("device-42"));
    }
}
