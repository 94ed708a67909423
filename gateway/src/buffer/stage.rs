//! The disk buffer in the data path: batchers → **writer** → write-ahead log → **feeder** → sink
//! driver.
//!
//! The writer (a thread) appends every batch to the log, one entry per item, and fsyncs per group
//! of batches (`fsync = "batch"`) or on a timer. After the fsync it settles the `ack =
//! "buffered"` tokens, parks the `ack = "committed"` tokens until the sink commits their entries,
//! and offers the batch, now holding no tokens, to the feeder. A batch in the log no longer holds
//! room in the fabric (it is returned once appended): from there on memory is bounded by the
//! few batches the feeder and the sink driver may hold. When the feeder is behind (the sink is
//! slow or down) the offer fails and the batch is dropped: its records stay on disk only, so an
//! outage fills the disk, not memory, and the devices are held back only when the log is full.
//!
//! The feeder (a thread) hands the sink entries strictly in log order: a batch still in memory
//! as it is, anything else read back from disk (after a restart: everything unacknowledged
//! first). Entries are one-to-one with items, so a batch knows its last sequence number
//! ([`Batch::wal_end`]); after the sink commits it, [`CommitLog::committed`] settles the parked
//! tokens and the writer acknowledges the log (coalesced), which deletes whole segments.
//!
//! When the log is full (`max_bytes`, or the disk), the writer waits, so the batchers wait, the
//! fabric fills and the devices are held back. Nothing is dropped.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use weir_protocols::mqtt::session::Outcome;

use super::{decode_item, encode_item, Corruption, Wal, WalError, WalOptions};
use crate::ack::AckToken;
use crate::config::{BufferConfig, FsyncPolicy};
use crate::fabric::{Batch, Item, Payload};
use crate::metrics::{Metrics, ReasonLabel, SourceLabel};

/// Batches appended together under one fsync at most.
const MAX_GROUP_BATCHES: usize = 16;
/// How long the writer waits between attempts when the log has no room.
const ROOM_RETRY: Duration = Duration::from_millis(20);
/// The watermark is persisted at most this often while the log has room (each is an fdatasync).
/// A crash replays what the sink committed since (duplicates, never loss).
const ACK_EVERY: Duration = Duration::from_millis(100);
/// How long the feeder sleeps when nothing is readable, before looking again.
const FEEDER_POLL: Duration = Duration::from_millis(10);
/// Batches the writer may have handed over in memory that the feeder has not taken (beyond
/// them, batches are read back from disk).
const HOT_BATCHES: usize = 8;

/// How long [`DiskBuffer::start`] waits for another user of the directory to let go (a gateway
/// in this process still shutting down) before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// What the stage shares between the writer, the feeder and the sink driver.
#[derive(Debug)]
struct Shared {
    wal: Mutex<Wal>,
    /// An exclusive lock on the directory, held while anything may still use the log: two
    /// writers would interleave their segments.
    _lock: std::fs::File,
    /// One past the last entry written to the files (readable by the feeder).
    readable_end: AtomicU64,
    /// Tokens waiting for the sink's commit, and the commit watermark.
    commits: Mutex<Commits>,
    /// The feeder is gone: no commit will ever free room again, so the writer stops waiting.
    feeder_gone: AtomicBool,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Default)]
struct Commits {
    /// Every entry up to here is committed by the sink (never moves back).
    through: u64,
    /// A batch failed for good (the grace period ended): nothing after it may be acknowledged.
    failed: bool,
    /// `ack = "committed"` tokens by the last entry of their batch, in log order.
    parked: VecDeque<(u64, Vec<AckToken>)>,
}

impl Shared {
    fn wal(&self) -> MutexGuard<'_, Wal> {
        self.wal.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn commits(&self) -> MutexGuard<'_, Commits> {
        self.commits.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Holds `tokens` until the sink has committed entry `wal_end`, or settles them now if it
    /// already has (the feeder may have delivered the entries from disk first).
    fn park(&self, wal_end: u64, tokens: Vec<AckToken>) {
        if tokens.is_empty() {
            return;
        }
        let mut commits = self.commits();
        if commits.through >= wal_end && !commits.failed {
            drop(commits);
            tokens.into_iter().for_each(|t| t.settle(Outcome::Stored));
        } else {
            commits.parked.push_back((wal_end, tokens));
        }
    }

    /// One past the last entry whose tokens still wait for a commit (0: none wait).
    fn parked_end(&self) -> u64 {
        self.commits().parked.back().map_or(0, |(end, _)| end + 1)
    }

    /// The backlog counts entries not acknowledged in the log: what a restart would replay (not
    /// committed by the sink, or committed and not recorded yet).
    fn update_gauges(&self, wal: &Wal) {
        self.metrics.buffer_bytes.set(wal.used_bytes() as i64);
        self.metrics.buffer_unacked_records.set(wal.next_seq().saturating_sub(wal.acked() + 1) as i64);
    }
}

/// The sink driver's side: reports which entries the sink committed.
#[derive(Debug)]
pub struct CommitLog {
    shared: Arc<Shared>,
}

impl CommitLog {
    /// The sink committed every entry up to `wal_end` (batches commit in log order): settles the
    /// tokens parked for them. The log itself is acknowledged by the writer, coalesced.
    pub fn committed(&self, wal_end: u64) {
        let mut settled = Vec::new();
        {
            let mut commits = self.shared.commits();
            if commits.failed {
                return;
            }
            commits.through = commits.through.max(wal_end);
            while commits.parked.front().is_some_and(|(end, _)| *end <= commits.through) {
                if let Some((_, tokens)) = commits.parked.pop_front() {
                    settled.push(tokens);
                }
            }
        }
        // Settled outside the lock: settling wakes connections.
        for token in settled.into_iter().flatten() {
            token.settle(Outcome::Stored);
        }
    }

    /// A batch was given up (the shutdown grace period ended): later commits must not move the
    /// watermark past it, so what it held is replayed at the next start.
    pub fn failed(&self) {
        self.shared.commits().failed = true;
    }

    /// Persists the watermark now (at shutdown, after the last commit), so a restart does not
    /// replay what the sink already has.
    pub fn persist(&self) {
        let through = {
            let commits = self.shared.commits();
            commits.through
        };
        let mut wal = self.shared.wal();
        if through > wal.acked() {
            if let Err(error) = wal.ack(through) {
                tracing::warn!(%error, "disk buffer: could not record the last acknowledgement (the sink may see duplicates after a restart)");
            }
        }
        self.shared.update_gauges(&wal);
    }
}

/// A running disk buffer: its threads, and what the sink driver reports to.
#[derive(Debug)]
pub struct DiskBuffer {
    pub commit_log: Arc<CommitLog>,
    threads: Vec<JoinHandle<()>>,
}

impl DiskBuffer {
    /// Opens (or creates) the log in `data_dir`/`config.dir`, reports what recovery found, and
    /// starts the writer (taking batches from `input`) and the feeder (replaying what the sink
    /// had not committed, then new batches, in batches of at most `max_records`). Returns the
    /// batches for the sink driver, in log order.
    pub fn start(
        config: &BufferConfig,
        data_dir: &Path,
        max_records: usize,
        metrics: Arc<Metrics>,
        input: flume::Receiver<Batch>,
    ) -> Result<(DiskBuffer, flume::Receiver<Batch>), String> {
        let dir = data_dir.join(&config.dir);
        let lock = lock_dir(&dir)?;
        let options = WalOptions { segment_bytes: config.segment_bytes, max_bytes: config.max_bytes };
        let (wal, recovery) =
            Wal::open(&dir, options).map_err(|e| format!("disk buffer {}: {e}", dir.display()))?;
        metrics.buffer_corruptions.inc_by(recovery.corruptions.len() as u64);
        metrics.buffer_lost_records.inc_by(recovery.corruptions.iter().map(lost_records).sum());
        metrics.buffer_replayed_records.inc_by(recovery.replay_entries);
        if recovery.replay_entries > 0 || !recovery.corruptions.is_empty() {
            tracing::info!(
                dir = %dir.display(),
                replay = recovery.replay_entries,
                replay_bytes = recovery.replay_bytes,
                damaged_regions = recovery.corruptions.len(),
                "disk buffer: replaying what the sink had not committed before new records"
            );
        }
        let start_at = recovery.acked + 1;
        let shared = Arc::new(Shared {
            readable_end: AtomicU64::new(wal.next_seq()),
            commits: Mutex::new(Commits { through: recovery.acked, ..Commits::default() }),
            wal: Mutex::new(wal),
            _lock: lock,
            feeder_gone: AtomicBool::new(false),
            metrics,
        });
        shared.update_gauges(&shared.wal());
        let (hot_tx, hot_rx) = flume::bounded(HOT_BATCHES);
        let (out_tx, out_rx) = flume::bounded(2);
        let writer = Writer {
            shared: Arc::clone(&shared),
            fsync: config.fsync,
            interval: Duration::from_millis(config.fsync_interval_ms),
            scratch: Vec::new(),
            unsynced: Vec::new(),
            dirty: false,
            failed: false,
            last_sync: Instant::now(),
            last_ack: Instant::now(),
        };
        let feeder = Feeder { shared: Arc::clone(&shared), next: start_at, max_records: max_records.max(1) };
        let spawn = |name: &str, body: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(body)
                .map_err(|e| format!("disk buffer: cannot start a thread: {e}"))
        };
        let threads = vec![
            spawn("weir-buffer-writer", Box::new(move || writer.run(input, hot_tx)))?,
            spawn("weir-buffer-feeder", Box::new(move || feeder.run(hot_rx, out_tx)))?,
        ];
        Ok((DiskBuffer { commit_log: Arc::new(CommitLog { shared }), threads }, out_rx))
    }

    /// Waits for both threads (they end after the input ended and the sink driver is gone).
    pub fn join(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// Takes an exclusive advisory lock on `dir/LOCK` (created with the directory if needed), so a
/// second weir on the same data directory fails to start instead of corrupting the log.
fn lock_dir(dir: &Path) -> Result<std::fs::File, String> {
    use rustix::fs::{flock, FlockOperation};
    let path = dir.join("LOCK");
    let file = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path))
        .map_err(|e| format!("disk buffer {}: {e}", path.display()))?;
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(file),
            Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(format!(
                    "disk buffer {} is in use by another weir process (locked {}); \
                     each instance needs its own data_dir",
                    dir.display(),
                    path.display()
                ))
            }
            Err(e) => return Err(format!("disk buffer {}: cannot lock: {e}", path.display())),
        }
    }
}

fn lost_records(corruption: &Corruption) -> u64 {
    corruption.lost_seqs.as_ref().map_or(0, |seqs| seqs.end - seqs.start)
}

struct Writer {
    shared: Arc<Shared>,
    fsync: FsyncPolicy,
    interval: Duration,
    scratch: Vec<u8>,
    /// `ack = "buffered"` tokens of entries written but not fsynced yet (`fsync = "interval"`).
    unsynced: Vec<AckToken>,
    /// Entries appended since the last fsync.
    dirty: bool,
    /// An fsync failed: nothing written since can be trusted, so nothing more is acknowledged.
    failed: bool,
    last_sync: Instant,
    last_ack: Instant,
}

impl Writer {
    fn run(mut self, input: flume::Receiver<Batch>, hot_tx: flume::Sender<Batch>) {
        let mut group: Vec<Batch> = Vec::new();
        let mut input_open = true;
        while input_open {
            let wait = match self.fsync {
                FsyncPolicy::Interval if self.dirty => self.interval.saturating_sub(self.last_sync.elapsed()),
                _ => ACK_EVERY,
            };
            match input.recv_timeout(wait) {
                Ok(batch) => group.push(batch),
                Err(flume::RecvTimeoutError::Timeout) => {}
                Err(flume::RecvTimeoutError::Disconnected) => input_open = false,
            }
            // Group commit: what is already waiting goes in with one fsync (a bounded group: a
            // fast producer must not keep one fsync, and its acks, waiting).
            group.extend(input.try_iter().take(MAX_GROUP_BATCHES.saturating_sub(group.len())));
            if self.failed {
                // Their tokens drop unsettled: the devices are not acked and resend.
                group.clear();
                continue;
            }
            if !self.append_group(&mut group) {
                return;
            }
            let due = match self.fsync {
                FsyncPolicy::Batch => true,
                FsyncPolicy::Interval => self.last_sync.elapsed() >= self.interval || !input_open,
            };
            let synced = self.write_out(due);
            if self.failed {
                group.clear();
                continue;
            }
            for batch in &mut group {
                let wal_end = batch.wal_end.unwrap_or(0);
                let mut parked = Vec::new();
                for token in batch.items.iter_mut().filter_map(|item| item.ack.take()) {
                    if !token.settles_at_sync() {
                        parked.push(token);
                    } else if synced {
                        token.settle(Outcome::Stored);
                    } else {
                        self.unsynced.push(token);
                    }
                }
                self.shared.park(wal_end, parked);
            }
            if synced {
                self.unsynced.drain(..).for_each(|t| t.settle(Outcome::Stored));
            }
            for batch in group.drain(..) {
                if let Err(flume::TrySendError::Full(spilled)) = hot_tx.try_send(batch) {
                    // The feeder is behind: the records stay on disk only and their room in
                    // the fabric returns now. The feeder reads them back.
                    drop(spilled);
                }
            }
        }
        // Input ended: make everything durable (its tokens were settled or parked above).
        if !self.failed && self.dirty {
            self.write_out(true);
            self.unsynced.drain(..).for_each(|t| t.settle(Outcome::Stored));
        }
    }

    /// Appends every item of `group`, waiting while the log has no room. False when the feeder
    /// is gone and room will never come (shutdown ran out of grace).
    fn append_group(&mut self, group: &mut [Batch]) -> bool {
        let shared = Arc::clone(&self.shared);
        let mut wal = shared.wal();
        for batch in group.iter_mut() {
            let mut rejected = Vec::new();
            for (index, item) in batch.items.iter().enumerate() {
                self.scratch.clear();
                encode_item(&item.payload, &mut self.scratch);
                let mut waited = false;
                loop {
                    match wal.append(&self.scratch) {
                        Ok(seq) => {
                            batch.wal_end = Some(seq);
                            if waited {
                                shared.metrics.buffer_waiting.set(0);
                                tracing::info!("disk buffer has room again");
                            }
                            break;
                        }
                        Err(WalError::EntryTooLarge { len, max }) => {
                            // The config check makes segments hold any accepted message; a
                            // record still too large is refused, not retried forever.
                            tracing::error!(
                                len,
                                max,
                                device = item.device_id(),
                                "record too large for a disk buffer segment; not stored"
                            );
                            shared
                                .metrics
                                .records_dropped
                                .get_or_create(&ReasonLabel { reason: "too_large_for_buffer" })
                                .inc();
                            rejected.push(index);
                            break;
                        }
                        Err(error) => {
                            drop(wal);
                            if !self.wait_for_room(&error) {
                                return false;
                            }
                            waited = true;
                            wal = shared.wal();
                        }
                    }
                }
            }
            // Entries are one per item: items not appended leave the batch (unacked).
            for index in rejected.into_iter().rev() {
                batch.items.remove(index);
            }
            batch.release_room();
            shared.metrics.buffer_appended_records.inc_by(batch.items.len() as u64);
            self.dirty = true;
        }
        true
    }

    /// Called without the log's lock after an append failed: makes what was appended readable
    /// (so the sink can drain it and free room), acknowledges what the sink committed, and
    /// sleeps a little. False when the feeder is gone.
    fn wait_for_room(&mut self, error: &WalError) -> bool {
        if matches!(error, WalError::Poisoned | WalError::SyncFailed { .. }) {
            self.fail(error);
            return false;
        }
        let metrics = &self.shared.metrics;
        let reason = match error {
            WalError::Full { .. } => "max_bytes",
            WalError::DiskFull { .. } => "disk_full",
            _ => "io",
        };
        if reason == "io" {
            metrics.buffer_errors.get_or_create(&ReasonLabel { reason: "append" }).inc();
            tracing::warn!(%error, "disk buffer: append failed; retrying (devices wait)");
        } else if metrics.buffer_waiting.get() == 0 {
            metrics.buffer_full.get_or_create(&ReasonLabel { reason }).inc();
            tracing::warn!(%error, "disk buffer full; devices wait until the sink frees room");
        }
        metrics.buffer_waiting.set(1);
        // Whatever is written can go to the sink meanwhile.
        self.write_out(false);
        self.acknowledge(true);
        std::thread::sleep(ROOM_RETRY);
        let alive = !self.shared.feeder_gone.load(Ordering::Acquire);
        if !alive {
            tracing::warn!(
                "disk buffer: the sink is gone while waiting for room; batches not written were not acked"
            );
        }
        alive
    }

    /// Writes what is appended to the files (fsyncing when `sync`), publishes it to the feeder
    /// and acknowledges the log. True when everything appended is now durable.
    fn write_out(&mut self, sync: bool) -> bool {
        let shared = Arc::clone(&self.shared);
        let mut wal = shared.wal();
        let result = if sync && self.dirty {
            let started = Instant::now();
            let result = wal.sync();
            shared.metrics.buffer_fsync_seconds.observe(started.elapsed().as_secs_f64());
            result
        } else {
            wal.flush()
        };
        let durable = match result {
            Ok(()) => {
                if sync {
                    self.dirty = false;
                    self.last_sync = Instant::now();
                }
                sync
            }
            Err(error) if error.is_no_room() => false,
            Err(error) => {
                drop(wal);
                self.fail(&error);
                return false;
            }
        };
        // What a failed write left pending stays unreadable until a later write succeeds.
        shared.readable_end.store(wal.written_end(), Ordering::Release);
        drop(wal);
        self.acknowledge(false);
        durable
    }

    /// Persists the sink's commit watermark in the log (which deletes wholly acknowledged
    /// segments): at most every [`ACK_EVERY`] unless `now`.
    fn acknowledge(&mut self, now: bool) {
        if !now && self.last_ack.elapsed() < ACK_EVERY {
            return;
        }
        let through = self.shared.commits().through;
        let mut wal = self.shared.wal();
        if through > wal.acked() {
            if let Err(error) = wal.ack(through) {
                self.shared.metrics.buffer_errors.get_or_create(&ReasonLabel { reason: "ack" }).inc();
                tracing::warn!(%error, "disk buffer: could not record an acknowledgement; retrying");
            }
        }
        self.last_ack = Instant::now();
        self.shared.update_gauges(&wal);
    }

    /// After a failed fsync nothing written since the last good one can be trusted: the buffer
    /// stops acknowledging (devices resend elsewhere or after a restart, which re-validates).
    fn fail(&mut self, error: &WalError) {
        if !self.failed {
            self.shared.metrics.buffer_errors.get_or_create(&ReasonLabel { reason: "fsync" }).inc();
            tracing::error!(%error, "disk buffer failed; no more records are acknowledged until weir restarts");
        }
        self.failed = true;
        // Unsettled: the devices are not acked.
        self.unsynced.clear();
    }
}

struct Feeder {
    shared: Arc<Shared>,
    /// The next entry to hand to the sink.
    next: u64,
    max_records: usize,
}

impl Feeder {
    fn run(mut self, hot: flume::Receiver<Batch>, out: flume::Sender<Batch>) {
        let mut held: Option<Batch> = None;
        let mut writer_done = false;
        // Ends when the sink driver is gone, too (shutdown out of grace).
        while !out.is_disconnected() {
            if held.is_none() {
                match hot.try_recv() {
                    Ok(batch) => held = Some(batch),
                    Err(flume::TryRecvError::Disconnected) => writer_done = true,
                    Err(flume::TryRecvError::Empty) => {}
                }
            }
            if let Some(batch) = held.take() {
                match self.take_from_memory(batch) {
                    Taken::Stale => continue,
                    Taken::Ready(batch) => {
                        if out.send(batch).is_err() {
                            break;
                        }
                        continue;
                    }
                    Taken::Later(batch) => held = Some(batch),
                }
            }
            // After the input ended only entries whose tokens wait for a commit must still go
            // (and batches still in memory, when next in order); the rest stays on disk for the
            // next start.
            let target = if writer_done { self.shared.parked_end() } else { u64::MAX };
            let readable = self.shared.readable_end.load(Ordering::Acquire);
            let limit = held.as_ref().map_or(readable, first_seq).min(readable).min(target);
            if self.next < limit {
                match self.read_from_disk(limit) {
                    Read::Batch(batch) => {
                        if out.send(batch).is_err() {
                            break;
                        }
                        continue;
                    }
                    Read::Skipped => continue,
                    Read::Nothing => {}
                }
            }
            if writer_done && self.next >= target {
                if held.take().is_some() {
                    // Entries before it are not needed now: it stays on disk.
                    continue;
                }
                break;
            }
            if held.is_some() {
                std::thread::sleep(FEEDER_POLL);
                continue;
            }
            match hot.recv_timeout(FEEDER_POLL) {
                Ok(batch) => held = Some(batch),
                Err(flume::RecvTimeoutError::Disconnected) => writer_done = true,
                Err(flume::RecvTimeoutError::Timeout) => {}
            }
        }
        self.shared.feeder_gone.store(true, Ordering::Release);
    }

    /// A batch the writer handed over in memory: sent as it is when it is next in log order
    /// (less what the disk reads already delivered), dropped when wholly delivered, kept while
    /// entries before it must be read from disk first.
    fn take_from_memory(&mut self, mut batch: Batch) -> Taken {
        let Some(end) = batch.wal_end else { return Taken::Stale };
        if end < self.next || batch.is_empty() {
            return Taken::Stale;
        }
        let first = first_seq(&batch);
        if first > self.next {
            return Taken::Later(batch);
        }
        batch.items.drain(..(self.next - first) as usize);
        self.next = end + 1;
        self.shared
            .metrics
            .buffer_read_records
            .get_or_create(&SourceLabel { source: "memory" })
            .inc_by(batch.len() as u64);
        Taken::Ready(batch)
    }

    /// Reads entries from `self.next` up to (not including) `limit`, at most `max_records`,
    /// skipping damage (reported).
    fn read_from_disk(&mut self, limit: u64) -> Read {
        let reader = self.shared.wal().read_from(self.next);
        let end = reader.end_seq().min(limit);
        let metrics = &self.shared.metrics;
        let mut items = Vec::new();
        let mut last = None;
        let mut full = false;
        for entry in reader {
            match entry {
                Ok(entry) if entry.seq >= limit => break,
                Ok(entry) => {
                    last = Some(entry.seq);
                    match decode_item(&entry.payload) {
                        Ok(Payload::Record(record)) => items.push(Item::record(record, None)),
                        Ok(Payload::DeadLetter(letter)) => items.push(Item::dead_letter(letter, None)),
                        Err(error) => {
                            metrics.buffer_corruptions.inc();
                            metrics.buffer_lost_records.inc();
                            tracing::warn!(seq = entry.seq, %error, "disk buffer entry skipped");
                        }
                    }
                    if items.len() >= self.max_records {
                        full = true;
                        break;
                    }
                }
                Err(error) => {
                    metrics.buffer_corruptions.inc();
                    tracing::warn!(%error, "disk buffer damage found while reading; skipped");
                }
            }
        }
        // Damaged entries were skipped: the next read starts after everything this one covered.
        let covered = match (full, last) {
            (true, Some(last)) => last + 1,
            _ => end.max(self.next),
        };
        if covered == self.next {
            return Read::Nothing;
        }
        self.next = covered;
        if items.is_empty() {
            return Read::Skipped;
        }
        metrics.buffer_read_records.get_or_create(&SourceLabel { source: "disk" }).inc_by(items.len() as u64);
        Read::Batch(Batch::from_log(items, covered - 1))
    }
}

enum Read {
    Batch(Batch),
    /// Only damaged entries: `next` moved past them.
    Skipped,
    /// Nothing readable yet.
    Nothing,
}

enum Taken {
    Stale,
    Ready(Batch),
    Later(Batch),
}

/// The log sequence number of a batch's first item.
fn first_seq(batch: &Batch) -> u64 {
    batch.wal_end.map_or(0, |end| end + 1 - batch.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ack::AckInbox;
    use crate::config::AckPoint;
    use weir_proto::Record;

    fn config(segment_bytes: u64, max_bytes: u64) -> BufferConfig {
        BufferConfig {
            kind: crate::config::BufferKind::Disk,
            dir: "buffer".into(),
            max_bytes,
            segment_bytes,
            fsync: FsyncPolicy::Batch,
            fsync_interval_ms: 100,
        }
    }

    /// A batch from the fabric: records of device `d` with `seqs`, one token each when `point`.
    fn batch(seqs: std::ops::Range<u64>, point: Option<(AckPoint, &Arc<AckInbox>)>) -> Batch {
        let items = seqs
            .map(|seq| {
                let record = Record { device_id: "d".into(), seq: Some(seq), ..Record::default() };
                let token = point.map(|(point, inbox)| AckToken::at(seq, Arc::clone(inbox), point));
                Item::record(record, token)
            })
            .collect();
        let mut batch = Batch::from_log(items, 0);
        batch.wal_end = None;
        batch
    }

    fn seqs(batch: &Batch) -> Vec<u64> {
        batch
            .items
            .iter()
            .map(|item| match &item.payload {
                Payload::Record(r) => r.seq.unwrap_or(u64::MAX),
                Payload::DeadLetter(_) => u64::MAX,
            })
            .collect()
    }

    fn start(
        dir: &Path,
        config: &BufferConfig,
    ) -> (DiskBuffer, flume::Sender<Batch>, flume::Receiver<Batch>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let (tx, rx) = flume::bounded(4);
        let (buffer, out) = DiskBuffer::start(config, dir, 64, Arc::clone(&metrics), rx).unwrap();
        (buffer, tx, out, metrics)
    }

    fn read(metrics: &Metrics, source: &'static str) -> u64 {
        metrics.buffer_read_records.get_or_create(&SourceLabel { source }).get()
    }

    /// A sink that stalls for a while makes the writer spill batches to disk only; the sink
    /// still gets every record exactly once, in order, part from memory and part from disk.
    #[test]
    fn a_stalled_sink_gets_everything_in_order_from_memory_and_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (buffer, tx, out, metrics) = start(dir.path(), &config(64 * 1024, 64 << 20));
        // The input stays open until the end: once it ends, only what must go is delivered.
        let producer = std::thread::spawn(move || {
            for i in 0..200 {
                tx.send(batch(i * 10..i * 10 + 10, None)).unwrap();
            }
            tx
        });
        std::thread::sleep(Duration::from_millis(300)); // the sink is stalled meanwhile
        let mut got = Vec::new();
        while got.len() < 2000 {
            let batch = out.recv_timeout(Duration::from_secs(10)).expect("the feeder delivers");
            got.extend(seqs(&batch));
            buffer.commit_log.committed(batch.wal_end.unwrap());
        }
        drop(producer.join().unwrap());
        assert_eq!(got, (0..2000).collect::<Vec<_>>());
        assert!(read(&metrics, "disk") > 0, "spilled batches were read back from disk");
        assert!(read(&metrics, "memory") + read(&metrics, "disk") == 2000);
        assert!(out.recv_timeout(Duration::from_secs(5)).is_err(), "input ended: the feeder ends");
        buffer.commit_log.persist();
        buffer.join();
        // Everything was committed: a restart replays nothing.
        let (buffer, tx, out, metrics) = start(dir.path(), &config(64 * 1024, 64 << 20));
        assert_eq!(metrics.buffer_replayed_records.get(), 0);
        drop(tx);
        assert!(out.recv_timeout(Duration::from_secs(5)).is_err());
        buffer.join();
    }

    /// A second user of the same directory is refused (after a short wait), with a reason.
    #[test]
    fn a_directory_in_use_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(64 * 1024, 64 << 20);
        let (buffer, tx, _out, _) = start(dir.path(), &cfg);
        let (_unused_tx, rx) = flume::bounded(1);
        let error = DiskBuffer::start(&cfg, dir.path(), 64, Arc::new(Metrics::new()), rx).unwrap_err();
        assert!(error.contains("in use by another weir process"), "{error}");
        drop((tx, _out));
        buffer.join();
        // Released once the first one is gone.
        let (buffer, tx, _out, _) = start(dir.path(), &cfg);
        drop((tx, _out));
        buffer.join();
    }

    /// Entries the sink never committed are replayed after a restart, in order, before new ones.
    #[test]
    fn uncommitted_entries_are_replayed_before_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(64 * 1024, 64 << 20);
        let (buffer, tx, out, _) = start(dir.path(), &cfg);
        tx.send(batch(0..30, None)).unwrap();
        tx.send(batch(30..50, None)).unwrap();
        let first = out.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(seqs(&first), (0..30).collect::<Vec<_>>());
        buffer.commit_log.committed(first.wal_end.unwrap());
        drop(tx); // the second batch is never committed
        while out.recv_timeout(Duration::from_secs(5)).is_ok() {}
        buffer.commit_log.persist();
        buffer.join();

        let (buffer, tx, out, metrics) = start(dir.path(), &cfg);
        assert_eq!(metrics.buffer_replayed_records.get(), 20);
        tx.send(batch(50..60, None)).unwrap();
        let mut got = Vec::new();
        while got.len() < 30 {
            let batch = out.recv_timeout(Duration::from_secs(10)).unwrap();
            got.extend(seqs(&batch));
            buffer.commit_log.committed(batch.wal_end.unwrap());
        }
        assert_eq!(got, (30..60).collect::<Vec<_>>());
        drop(tx);
        while out.recv_timeout(Duration::from_secs(5)).is_ok() {}
        buffer.commit_log.persist();
        buffer.join();
    }

    /// `buffered` acks are settled by the fsync, with the sink never reading; `committed` acks
    /// only once the sink committed their entries.
    #[test]
    fn buffered_acks_follow_the_fsync_and_committed_acks_the_sink() {
        let dir = tempfile::tempdir().unwrap();
        let (buffer, tx, out, _) = start(dir.path(), &config(64 * 1024, 64 << 20));
        let buffered = AckInbox::new();
        let committed = AckInbox::new();
        tx.send(batch(0..5, Some((AckPoint::Buffered, &buffered)))).unwrap();
        tx.send(batch(5..8, Some((AckPoint::Committed, &committed)))).unwrap();
        let mut acked = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while acked.len() < 5 && Instant::now() < deadline {
            acked.extend(buffered.try_next());
            std::thread::sleep(Duration::from_millis(5));
        }
        acked.sort_unstable_by_key(|(id, _)| *id);
        assert_eq!(acked, (0..5).map(|id| (id, Outcome::Stored)).collect::<Vec<_>>());
        std::thread::sleep(Duration::from_millis(100));
        assert!(committed.try_next().is_none(), "not acked before the sink commits");
        let mut delivered = 0;
        while delivered < 8 {
            let batch = out.recv_timeout(Duration::from_secs(10)).unwrap();
            delivered += batch.len();
            if batch.wal_end.unwrap() < 8 {
                assert!(committed.try_next().is_none());
            }
            buffer.commit_log.committed(batch.wal_end.unwrap());
        }
        let mut acked: Vec<_> = std::iter::from_fn(|| committed.try_next()).collect();
        acked.sort_unstable_by_key(|(id, _)| *id);
        assert_eq!(acked, (5..8).map(|id| (id, Outcome::Stored)).collect::<Vec<_>>());
        drop(tx);
        while out.recv_timeout(Duration::from_secs(5)).is_ok() {}
        buffer.join();
    }

    /// At `max_bytes` the writer waits (the input backs up) until commits free whole segments;
    /// nothing is dropped.
    #[test]
    fn a_full_log_holds_the_input_until_commits_free_room() {
        let dir = tempfile::tempdir().unwrap();
        let (buffer, tx, out, metrics) = start(dir.path(), &config(64 * 1024, 128 * 1024));
        let producer = std::thread::spawn(move || {
            let big = "x".repeat(900);
            for i in 0..80u64 {
                let mut b = batch(i * 10..i * 10 + 10, None);
                for item in &mut b.items {
                    if let Payload::Record(r) = &mut item.payload {
                        r.raw = big.clone().into_bytes();
                    }
                }
                tx.send(b).unwrap();
            }
            tx
        });
        // ~800 KB of records into a 128 KiB log with the sink stalled: the writer must wait, and
        // with it the input (a bounded channel and the writer's bounded group).
        let waited = (0..500).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            metrics.buffer_waiting.get() == 1
        });
        assert!(waited, "the log filled up");
        assert!(!producer.is_finished(), "the input is held back");
        let mut got = Vec::new();
        while got.len() < 800 {
            let batch = out.recv_timeout(Duration::from_secs(10)).expect("delivered once room returns");
            got.extend(seqs(&batch));
            buffer.commit_log.committed(batch.wal_end.unwrap());
        }
        drop(producer.join().unwrap());
        assert_eq!(got, (0..800).collect::<Vec<_>>());
        assert!(metrics.buffer_full.get_or_create(&ReasonLabel { reason: "max_bytes" }).get() > 0);
        buffer.commit_log.persist();
        buffer.join();
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// The batchers hand over a batch of this many records.
        Send(u64),
        /// The sink takes up to this many batches (committing them unless stalled).
        Take(usize),
        /// The sink stops committing (what it takes is never committed) until the restart.
        Stall,
        /// weir stops (input ends, the sink is gone) and starts again on the same directory.
        Restart,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (1u64..40).prop_map(Op::Send),
            4 => (0usize..4).prop_map(Op::Take),
            1 => Just(Op::Stall),
            1 => Just(Op::Restart),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]

        /// Whatever the interleaving of writes, sink stalls and restarts, the records the sink
        /// commits are every record sent, each once, in order: what a stalled sink held is
        /// replayed after the restart, and nothing committed is replayed.
        #[test]
        fn commits_are_every_record_once_in_order(ops in proptest::collection::vec(op(), 1..30)) {
            let dir = tempfile::tempdir().unwrap();
            // Small segments, so segments are created and deleted along the way.
            let cfg = config(64 * 1024, 64 << 20);
            let (mut buffer, mut tx, mut out, _) = start(dir.path(), &cfg);
            let mut sent = 0u64;
            let mut committed = Vec::new();
            // A stalled sink holds what it took, uncommitted (a sink driver commits in order).
            let mut stalled: Option<Vec<Batch>> = None;
            let commit = |buffer: &DiskBuffer, batch: Batch, committed: &mut Vec<u64>| {
                committed.extend(seqs(&batch));
                buffer.commit_log.committed(batch.wal_end.unwrap());
            };
            for op in ops {
                match op {
                    Op::Send(n) => {
                        tx.send(batch(sent..sent + n, None)).unwrap();
                        sent += n;
                    }
                    Op::Take(k) => {
                        for _ in 0..k {
                            let Ok(batch) = out.recv_timeout(Duration::from_millis(20)) else { break };
                            match &mut stalled {
                                Some(held) => held.push(batch),
                                None => commit(&buffer, batch, &mut committed),
                            }
                        }
                    }
                    Op::Stall => stalled = stalled.or_else(|| Some(Vec::new())),
                    Op::Restart => {
                        drop(tx);
                        while let Ok(batch) = out.recv_timeout(Duration::from_secs(2)) {
                            match &mut stalled {
                                Some(held) => held.push(batch),
                                None => commit(&buffer, batch, &mut committed),
                            }
                        }
                        drop(out);
                        // What the stalled sink held is given up, uncommitted.
                        stalled = None;
                        buffer.commit_log.persist();
                        buffer.join();
                        (buffer, tx, out, _) = start(dir.path(), &cfg);
                    }
                }
            }
            // The sink recovers: it commits what it held, then takes everything.
            for batch in stalled.take().unwrap_or_default() {
                commit(&buffer, batch, &mut committed);
            }
            while (committed.len() as u64) < sent {
                let batch = out.recv_timeout(Duration::from_secs(10)).expect("the rest is delivered");
                commit(&buffer, batch, &mut committed);
            }
            proptest::prop_assert_eq!(committed, (0..sent).collect::<Vec<_>>());
            drop(tx);
            while out.recv_timeout(Duration::from_secs(2)).is_ok() {}
            buffer.join();
        }
    }
}
