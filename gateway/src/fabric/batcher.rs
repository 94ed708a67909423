//! The per-shard batcher: closes a batch at a record count, a byte size, or `linger` after its
//! first item, and flushes the partial batch when its input ends (shutdown loses nothing).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use weir_protocols::mqtt::session::Outcome;

use super::{Budget, Item, ShardReceiver};
use crate::sources::Sources;

/// When a batch closes.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_records: usize,
    pub max_bytes: usize,
    pub linger: Duration,
}

/// Items from one shard, written by the sink as one unit. Dropping it returns the items'
/// room to the shard, so the shard bound covers everything up to the commit.
#[derive(Debug)]
pub struct Batch {
    pub items: Vec<Item>,
    bytes: usize,
    /// Items pushed (settling drains `items`; the room to return stays counted here).
    records: usize,
    charged: usize,
    /// The shard room the items hold; none for items read back from the disk buffer.
    budget: Option<Arc<Budget>>,
    /// Batches merged into this one (their items moved here); they return their room when
    /// this batch drops.
    absorbed: Vec<Batch>,
    /// With a disk buffer: the log sequence number of the last item (items are consecutive
    /// entries), acknowledged to the log once the sink committed the batch.
    pub wal_end: Option<u64>,
}

impl Batch {
    fn new(budget: Arc<Budget>, capacity: usize) -> Self {
        Self {
            items: Vec::with_capacity(capacity),
            bytes: 0,
            records: 0,
            charged: 0,
            budget: Some(budget),
            absorbed: Vec::new(),
            wal_end: None,
        }
    }

    /// A batch of items that hold no shard room (read back from the disk buffer), ending at
    /// log sequence `wal_end`.
    pub fn from_log(items: Vec<Item>, wal_end: u64) -> Self {
        let bytes = items.iter().map(|i| i.bytes).sum();
        Self {
            records: items.len(),
            items,
            bytes,
            charged: 0,
            budget: None,
            absorbed: Vec::new(),
            wal_end: Some(wal_end),
        }
    }

    fn push(&mut self, item: Item) {
        self.bytes += item.bytes;
        self.records += 1;
        if let Some(budget) = &self.budget {
            self.charged += budget.charge(item.bytes);
        }
        self.items.push(item);
    }

    /// Returns the items' room to their shard now, ahead of the drop (the disk buffer does once
    /// the items are in its log: from there on its own bounds hold them).
    pub fn release_room(&mut self) {
        if let Some(budget) = self.budget.take() {
            budget.release(self.records, self.charged);
        }
        self.records = 0;
        self.charged = 0;
        for absorbed in &mut self.absorbed {
            absorbed.release_room();
        }
    }

    /// Approximate bytes the items hold.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Moves `other`'s items to the end of this batch, so a sink writes both in one commit
    /// (group commit). Room in the fabric comes back when this batch drops.
    pub fn absorb(&mut self, mut other: Batch) {
        self.items.append(&mut other.items);
        self.bytes += other.bytes;
        self.wal_end = self.wal_end.max(other.wal_end);
        self.absorbed.push(other);
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Reports one outcome for every item (acks flow back to the devices), then frees the room.
    pub fn settle(mut self, outcome: Outcome) {
        for item in self.items.drain(..) {
            item.settle(outcome);
        }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // Items still here were not settled: their ack tokens report `Failed` as they drop.
        self.items.clear();
        if let Some(budget) = &self.budget {
            budget.release(self.records, self.charged);
        }
    }
}

/// Drains one shard into batches sent to the sink driver, until the shard's senders are gone.
/// `observer`: the source table and this shard's index in it; each batch is shown to it.
pub async fn run_batcher(
    shard: ShardReceiver,
    limits: BatchLimits,
    batches_tx: flume::Sender<Batch>,
    observer: Option<(Arc<Sources>, usize)>,
) {
    let ShardReceiver { items_rx, budget } = shard;
    loop {
        let Ok(first) = items_rx.recv_async().await else { return };
        let mut batch = Batch::new(Arc::clone(&budget), limits.max_records.min(1024));
        batch.push(first);
        let deadline = Instant::now() + limits.linger;
        let mut input_ended = false;
        while batch.len() < limits.max_records && batch.bytes < limits.max_bytes {
            // Take what is already queued without waiting; wait only when the queue is empty.
            match items_rx.try_recv() {
                Ok(item) => {
                    batch.push(item);
                    continue;
                }
                Err(flume::TryRecvError::Disconnected) => {
                    input_ended = true;
                    break;
                }
                Err(flume::TryRecvError::Empty) => {}
            }
            tokio::select! {
                received = items_rx.recv_async() => match received {
                    Ok(item) => batch.push(item),
                    Err(_) => { input_ended = true; break; }
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        if let Some((sources, index)) = &observer {
            sources.observe(*index, &batch.items, crate::listener::ingest::now_ms());
        }
        // A failed send means the sink driver is gone: the batch drops and fails its acks.
        if batches_tx.send_async(batch).await.is_err() || input_ended {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Fabric;
    use super::*;
    use crate::config::WhenFull;
    use crate::metrics::Metrics;
    use weir_proto::Record;

    fn item(seq: u64) -> Item {
        Item::record(Record { device_id: "d".into(), seq: Some(seq), ..Record::default() }, None)
    }

    fn setup(
        max_records: usize,
        linger_ms: u64,
    ) -> (Fabric, flume::Receiver<Batch>, tokio::task::JoinHandle<()>) {
        let (fabric, mut shards) = Fabric::new(1, 1000, 1 << 30, WhenFull::Block, Arc::new(Metrics::new()));
        let (batches_tx, batches_rx) = flume::bounded(4);
        let limits =
            BatchLimits { max_records, max_bytes: 1 << 30, linger: Duration::from_millis(linger_ms) };
        let task = tokio::spawn(run_batcher(shards.pop().unwrap(), limits, batches_tx, None));
        (fabric, batches_rx, task)
    }

    fn seqs(batch: &Batch) -> Vec<u64> {
        batch
            .items
            .iter()
            .map(|i| match &i.payload {
                super::super::Payload::Record(r) => r.seq.unwrap(),
                _ => unreachable!(),
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn closes_at_max_records_in_order() {
        let (fabric, batches, _task) = setup(3, 1000);
        for seq in 0..7 {
            fabric.send(item(seq)).await.unwrap();
        }
        assert_eq!(seqs(&batches.recv_async().await.unwrap()), [0, 1, 2]);
        assert_eq!(seqs(&batches.recv_async().await.unwrap()), [3, 4, 5]);
        // The 7th waits for the linger deadline, then goes alone.
        let started = Instant::now();
        assert_eq!(seqs(&batches.recv_async().await.unwrap()), [6]);
        assert!(started.elapsed() >= Duration::from_millis(999), "{:?}", started.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn linger_counts_from_the_first_item() {
        let (fabric, batches, _task) = setup(100, 10);
        fabric.send(item(1)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(6)).await;
        fabric.send(item(2)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(6)).await;
        fabric.send(item(3)).await.unwrap();
        assert_eq!(seqs(&batches.recv_async().await.unwrap()), [1, 2]);
        assert_eq!(seqs(&batches.recv_async().await.unwrap()), [3]);
    }

    #[tokio::test(start_paused = true)]
    async fn merged_batches_return_all_their_room_when_dropped() {
        let metrics = Arc::new(Metrics::new());
        let (fabric, mut shards) = Fabric::new(1, 4, 1 << 30, WhenFull::DropNewest, Arc::clone(&metrics));
        let (batches_tx, batches) = flume::bounded(4);
        let limits = BatchLimits { max_records: 2, max_bytes: 1 << 30, linger: Duration::from_millis(1) };
        let _task = tokio::spawn(run_batcher(shards.pop().unwrap(), limits, batches_tx, None));
        for seq in 0..4 {
            fabric.send(item(seq)).await.unwrap();
        }
        assert!(matches!(fabric.send(item(9)).await, Err(crate::fabric::SendError::Full(_))));
        let mut first = batches.recv_async().await.unwrap();
        first.absorb(batches.recv_async().await.unwrap());
        assert_eq!(seqs(&first), [0, 1, 2, 3]);
        let gauge = || metrics.shard_records.get_or_create(&crate::metrics::ShardLabel { shard: 0 }).get();
        assert_eq!(gauge(), 4);
        first.settle(Outcome::Stored);
        assert_eq!(gauge(), 0);
        for seq in 10..14 {
            fabric.send(item(seq)).await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn flushes_the_partial_batch_when_input_ends() {
        let (fabric, batches, task) = setup(100, 60_000);
        fabric.send(item(1)).await.unwrap();
        fabric.send(item(2)).await.unwrap();
        drop(fabric);
        let started = Instant::now();
        assert_eq!(seqs(&batches.recv_async().await.unwrap()), [1, 2]);
        assert!(started.elapsed() < Duration::from_secs(1));
        task.await.unwrap();
        assert!(batches.recv_async().await.is_err(), "batcher ended and dropped its sender");
    }
}
