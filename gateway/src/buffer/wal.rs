//! The write-ahead log: a directory of segments, appended to, fsynced when the caller asks,
//! validated and replayed after a restart, deleted a whole segment at a time once acknowledged.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::ack::{sync_dir, AckFile, AckState};
use super::error::{Corruption, CorruptionReason, Repair, WalError};
use super::format::{
    encode_frame, encode_segment_header, frame_len, parse_segment_file_name, segment_file_name,
    FRAME_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use super::reader::{Reader, SegmentPlan};
use super::scan::{scan_segment, Run, RUN_SPLIT_BYTES};

/// Appended frames are gathered in memory up to this many bytes before one write.
const WRITE_BUFFER_BYTES: u64 = 128 * 1024;
/// The smallest segment that can hold a header and a one-byte entry, with some room.
const MIN_SEGMENT_BYTES: u64 = 64;

/// Sizes of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalOptions {
    /// A segment is closed (written and fsynced) and a new one started when the next entry
    /// would make it larger than this. It also bounds one entry: at most `segment_bytes` − 40
    /// bytes of payload ([`WalError::EntryTooLarge`] beyond). At least 64, at most 4 GiB.
    pub segment_bytes: u64,
    /// Bytes the log may take on disk (all segment files, including acknowledged entries in a
    /// segment not yet wholly acknowledged). An append that would go past it fails with
    /// [`WalError::Full`]. Space is freed a whole segment at a time, so keep this a few times
    /// `segment_bytes`. At least `segment_bytes`.
    pub max_bytes: u64,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions { segment_bytes: 64 * 1024 * 1024, max_bytes: 1024 * 1024 * 1024 }
    }
}

impl WalOptions {
    fn validate(&self) -> Result<(), WalError> {
        if self.segment_bytes < MIN_SEGMENT_BYTES || self.segment_bytes > u64::from(u32::MAX) {
            return Err(WalError::InvalidOptions(format!(
                "segment_bytes = {} must be between {MIN_SEGMENT_BYTES} and {}",
                self.segment_bytes,
                u32::MAX
            )));
        }
        if self.max_bytes < self.segment_bytes {
            return Err(WalError::InvalidOptions(format!(
                "max_bytes = {} must be at least segment_bytes = {}",
                self.max_bytes, self.segment_bytes
            )));
        }
        Ok(())
    }

    /// The largest payload one entry may have.
    pub fn max_entry_bytes(&self) -> u64 {
        self.segment_bytes - SEGMENT_HEADER_LEN - FRAME_HEADER_LEN
    }
}

/// What [`Wal::open`] found: what to replay, and what was damaged or cleaned up.
///
/// Opening is idempotent: opening the same directory again replays the same entries. The
/// repairs made (a torn tail truncated, a leftover deleted) are not reported again; damage
/// that was skipped over in place is.
#[derive(Debug)]
pub struct Recovery {
    /// The acknowledged watermark: every entry up to it had been acknowledged.
    pub acked: u64,
    /// The sequence number the next append gets.
    pub next_seq: u64,
    /// How many entries `replay` yields, barring damage that appears after the open.
    pub replay_entries: u64,
    /// Their payload bytes.
    pub replay_bytes: u64,
    /// Every damaged region, in log order (each was also logged as a warning).
    pub corruptions: Vec<Corruption>,
    /// Segment files deleted because nothing in them needed replaying: wholly acknowledged
    /// (left by a crash between persisting the watermark and deleting), or holding no entry.
    pub deleted_segments: Vec<PathBuf>,
    /// The entries after `acked`, in sequence order, read lazily from disk.
    pub replay: Reader,
}

/// A segment no longer written to.
#[derive(Debug)]
struct Segment {
    first_seq: u64,
    path: PathBuf,
    /// Its length on disk.
    bytes: u64,
    /// Where its good entries are.
    runs: Vec<Run>,
}

/// The segment being appended to.
#[derive(Debug)]
struct ActiveSegment {
    first_seq: u64,
    path: PathBuf,
    file: File,
    /// Bytes in the file, all complete frames (after the header).
    written: u64,
    /// Bytes of the file known to be on disk.
    synced: u64,
    /// Frames (and, for a new segment, its header) not written yet.
    pending: Vec<u8>,
    /// How many entries `pending` holds.
    pending_entries: u64,
    /// Where the written entries are, a run per [`RUN_SPLIT_BYTES`] or so (the log's sparse
    /// index: a reader starts at the run holding its first entry).
    runs: Vec<Run>,
}

impl ActiveSegment {
    fn len(&self) -> u64 {
        self.written + self.pending.len() as u64
    }

    /// Writes the pending bytes (entries up to `next_seq`, excluded). On failure the file is cut
    /// back to the last complete frame (releasing whatever a partial write took) and the bytes
    /// stay pending, so a retry can succeed once space returns. If even that cut fails,
    /// `poisoned` is set.
    fn flush(&mut self, next_seq: u64, poisoned: &mut bool) -> Result<(), WalError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let result =
            self.file.seek(SeekFrom::Start(self.written)).and_then(|_| self.file.write_all(&self.pending));
        if let Err(e) = result {
            if self.file.set_len(self.written).is_err() {
                *poisoned = true;
            }
            return Err(WalError::io("write", &self.path, e));
        }
        // A new segment's first write starts with its header.
        let start = self.written.max(SEGMENT_HEADER_LEN);
        self.written += self.pending.len() as u64;
        if self.pending_entries > 0 {
            let first_seq = next_seq - self.pending_entries;
            match self.runs.last_mut() {
                Some(last) if last.end == start && last.end - last.start < RUN_SPLIT_BYTES => {
                    last.end = self.written;
                    last.end_seq = next_seq;
                }
                _ => self.runs.push(Run { start, end: self.written, first_seq, end_seq: next_seq }),
            }
        }
        self.pending.clear();
        self.pending_entries = 0;
        Ok(())
    }

    /// Makes the written bytes durable; a failure poisons the log (see [`WalError::SyncFailed`]).
    fn sync(&mut self, poisoned: &mut bool) -> Result<(), WalError> {
        if self.synced < self.written {
            if let Err(source) = self.file.sync_data() {
                *poisoned = true;
                return Err(WalError::SyncFailed { path: self.path.clone(), source });
            }
            self.synced = self.written;
        }
        Ok(())
    }
}

/// A segmented, append-only, checksummed write-ahead log in one directory.
///
/// Synchronous: run it on a blocking thread. Entries are opaque byte strings numbered by
/// consecutive sequence numbers. [`append`](Wal::append) buffers; [`sync`](Wal::sync) makes
/// everything appended durable; [`ack`](Wal::ack) records that entries up to a sequence number
/// are delivered, so whole segments can be deleted. Nothing is durable until `sync` returns;
/// dropping the log without `sync` loses what was appended since (which a crash would too).
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    options: WalOptions,
    /// Closed segments, oldest first.
    segments: VecDeque<Segment>,
    /// Created at the first append after open, after a rotation, or after it was discarded.
    active: Option<ActiveSegment>,
    ack_file: AckFile,
    acked: u64,
    next_seq: u64,
    /// Sum of the closed segments' lengths.
    closed_bytes: u64,
    /// A segment file was created since the directory was last fsynced.
    dir_needs_sync: bool,
    /// An fsync failed: only reading and reopening are allowed.
    poisoned: bool,
}

impl Wal {
    /// Opens (creating if needed) the log in `dir`: validates every entry of every segment,
    /// repairs what a crash can leave (a torn tail of the newest segment is truncated, segments
    /// left wholly acknowledged are deleted), and returns what must be replayed. Damage is
    /// reported in [`Recovery::corruptions`], never a panic: a damaged entry costs only what
    /// cannot be framed (an entry with a damaged payload costs itself; a damaged length costs
    /// the rest of its segment), and the entries after it are replayed.
    ///
    /// New entries always go to a new segment, created at the first append.
    pub fn open(dir: impl AsRef<Path>, options: WalOptions) -> Result<(Wal, Recovery), WalError> {
        options.validate()?;
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| WalError::io("create directory", &dir, e))?;
        let mut files = list_segments(&dir)?;
        let mut corruptions = Vec::new();
        let mut deleted_segments = Vec::new();

        let (mut ack_file, ack_state) = AckFile::open(&dir)?;
        // Without a trustworthy watermark, replay everything there is: duplicates, not loss.
        let fallback = files.first().map_or(0, |(first_seq, _)| first_seq - 1);
        let ack_problem = |reason| Corruption {
            file: ack_file.path().to_path_buf(),
            offset: 0,
            skipped_bytes: 0,
            lost_seqs: None,
            reason,
            repair: Repair::Rewritten,
        };
        let acked = match ack_state {
            AckState::Valid(acked) => acked,
            AckState::Created if files.is_empty() => 0,
            AckState::Created => {
                corruptions.push(ack_problem(CorruptionReason::AckFileMissing));
                fallback
            }
            AckState::Corrupt => {
                corruptions.push(ack_problem(CorruptionReason::AckFileCorrupt));
                fallback
            }
        };
        if ack_state == AckState::Corrupt || (ack_state == AckState::Created && acked > 0) {
            ack_file.store(acked)?;
        }

        // A segment is wholly acknowledged when the next one starts at or before acked + 1.
        // The newest has no next one: it is judged after its scan.
        let mut leftovers = 0;
        while files.len() > leftovers + 1 && files[leftovers + 1].0 <= acked.saturating_add(1) {
            leftovers += 1;
        }
        for (_, path) in files.drain(..leftovers) {
            remove_segment(&path)?;
            deleted_segments.push(path);
        }

        let mut scanned = Vec::with_capacity(files.len());
        for (index, (first_seq, path)) in files.iter().enumerate() {
            let seq_limit = files.get(index + 1).map(|(first_seq, _)| *first_seq);
            let file = File::open(path).map_err(|e| WalError::io("open", path, e))?;
            let len = file.metadata().map_err(|e| WalError::io("stat", path, e))?.len();
            let scan = scan_segment(file, path, len, *first_seq, seq_limit, acked)?;
            scanned.push((*first_seq, path.clone(), len, scan));
        }
        // Newest segments with nothing to replay go: created just before a crash (torn header,
        // no complete entry), or wholly acknowledged. Their sequence numbers were never durable
        // or are acknowledged, so numbering goes on from the newest entry kept.
        let mut trailing = Vec::new();
        while scanned
            .last()
            .is_some_and(|(_, _, _, scan)| !scan.unreadable && scan.last_seq.is_none_or(|last| last <= acked))
        {
            let Some((_, path, _, scan)) = scanned.pop() else { break };
            remove_segment(&path)?;
            trailing
                .extend(scan.corruptions.into_iter().map(|c| Corruption { repair: Repair::Deleted, ..c }));
            deleted_segments.push(path);
        }
        trailing.reverse();
        let mut next_seq = acked.saturating_add(1);
        if let Some((first_seq, _, len, scan)) = scanned.last() {
            next_seq = next_seq.max(scan.last_seq.map_or(0, |last_seq| last_seq + 1));
            if scan.unreadable {
                // Left as it is (the error may pass), and numbered past anything it can hold.
                // Saturating: fuzzing found an overflow with one named near u64::MAX (appending
                // is then refused, see `append`).
                let capacity = len.saturating_sub(SEGMENT_HEADER_LEN) / FRAME_HEADER_LEN + 1;
                next_seq = next_seq.max(first_seq.saturating_add(capacity));
            }
        }
        if let Some((_, path, len, scan)) = scanned.last_mut().filter(|(_, _, _, scan)| !scan.unreadable) {
            // Cut a torn tail so the file ends with whole entries, and make durable what this
            // open has seen (it may have been written but not fsynced before a crash).
            let file =
                OpenOptions::new().write(true).open(&*path).map_err(|e| WalError::io("open", path, e))?;
            if let Some(at) = scan.tail_lost_at {
                file.set_len(at).map_err(|e| WalError::io("truncate", path, e))?;
                for corruption in scan.corruptions.iter_mut().filter(|c| c.offset == at) {
                    corruption.repair = Repair::Truncated;
                }
                *len = at;
            }
            file.sync_all().map_err(|e| WalError::io("fsync", path, e))?;
        }
        let (mut replay_entries, mut replay_bytes) = (0, 0);
        let mut segments = VecDeque::with_capacity(scanned.len());
        for (first_seq, path, bytes, scan) in scanned {
            replay_entries += scan.replay_entries;
            replay_bytes += scan.replay_bytes;
            corruptions.extend(scan.corruptions);
            segments.push_back(Segment { first_seq, path, bytes, runs: scan.runs });
        }
        corruptions.extend(trailing);
        sync_dir(&dir)?;

        for corruption in &corruptions {
            tracing::warn!(dir = %dir.display(), "write-ahead log damage: {corruption}");
        }
        for path in &deleted_segments {
            tracing::info!(segment = %path.display(), "deleted a write-ahead log segment with nothing to replay");
        }
        let closed_bytes = segments.iter().map(|s| s.bytes).sum();
        let wal = Wal {
            dir,
            options,
            segments,
            active: None,
            ack_file,
            acked,
            next_seq,
            closed_bytes,
            dir_needs_sync: false,
            poisoned: false,
        };
        let replay = wal.read_from(acked.saturating_add(1));
        let recovery =
            Recovery { acked, next_seq, replay_entries, replay_bytes, corruptions, deleted_segments, replay };
        Ok((wal, recovery))
    }

    /// Appends one entry and returns its sequence number. Buffered: durable only after the
    /// next [`sync`](Wal::sync). Starts a new segment when this entry would make the current
    /// one larger than `segment_bytes` (the old one is written and fsynced first).
    ///
    /// On [`WalError::Full`] or [`WalError::DiskFull`] nothing was appended and no sequence
    /// number used; retry once [`ack`](Wal::ack) (or the disk) has freed space.
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, WalError> {
        self.check_usable()?;
        // Found by fuzzing (wal_segments): a segment named for u64::MAX or a watermark near it
        // made `next_seq += 1` overflow (a panic, or a wrap to 0 in release builds that would
        // number new entries as already acknowledged).
        if self.next_seq == u64::MAX {
            return Err(WalError::SequenceExhausted);
        }
        let len = payload.len() as u64;
        if len > self.options.max_entry_bytes() {
            return Err(WalError::EntryTooLarge { len, max: self.options.max_entry_bytes() });
        }
        let frame = frame_len(len);
        let mut rotate =
            self.active.as_ref().is_none_or(|active| active.len() + frame > self.options.segment_bytes);
        if self.used_bytes() + frame + if rotate { SEGMENT_HEADER_LEN } else { 0 } > self.options.max_bytes {
            // Reclaim what acknowledgements allow before saying no.
            self.delete_acked_segments()?;
            if self.active.is_some() && self.next_seq - 1 <= self.acked {
                self.discard_active()?;
                rotate = true;
            }
            let needed = frame + if rotate { SEGMENT_HEADER_LEN } else { 0 };
            if self.used_bytes() + needed > self.options.max_bytes {
                return Err(WalError::Full { used: self.used_bytes(), max: self.options.max_bytes });
            }
        }
        let mut active = match self.active.take() {
            Some(active) if !rotate => active,
            old => self.rotate(old)?,
        };
        if !active.pending.is_empty() && active.pending.len() as u64 + frame > WRITE_BUFFER_BYTES {
            if let Err(e) = active.flush(self.next_seq, &mut self.poisoned) {
                self.active = Some(active);
                return Err(e);
            }
        }
        let seq = self.next_seq;
        encode_frame(seq, payload, &mut active.pending);
        active.pending_entries += 1;
        self.active = Some(active);
        self.next_seq += 1;
        Ok(seq)
    }

    /// Writes what is buffered, without fsync: makes it readable by [`read_from`](Wal::read_from).
    pub fn flush(&mut self) -> Result<(), WalError> {
        self.check_usable()?;
        match self.active.as_mut() {
            Some(active) => active.flush(self.next_seq, &mut self.poisoned),
            None => Ok(()),
        }
    }

    /// Writes and fsyncs everything appended so far (and the directory, when a segment was
    /// created). Call it per batch (`fsync = "batch"`) or on a timer; when it returns, every
    /// entry appended before survives a crash.
    pub fn sync(&mut self) -> Result<(), WalError> {
        self.check_usable()?;
        if let Some(active) = self.active.as_mut() {
            active.flush(self.next_seq, &mut self.poisoned)?;
            active.sync(&mut self.poisoned)?;
        }
        if self.dir_needs_sync {
            if let Err(source) = File::open(&self.dir).and_then(|dir| dir.sync_all()) {
                self.poisoned = true;
                return Err(WalError::SyncFailed { path: self.dir.clone(), source });
            }
            self.dir_needs_sync = false;
        }
        Ok(())
    }

    /// Records that every entry up to `up_to` is delivered: persists the watermark (one small
    /// in-place write and fdatasync; callers may coalesce acknowledgements), then deletes the
    /// segments whose entries are all acknowledged. Acknowledging less than
    /// [`acked`](Wal::acked) again is a no-op.
    pub fn ack(&mut self, up_to: u64) -> Result<(), WalError> {
        self.check_usable()?;
        if up_to >= self.next_seq {
            return Err(WalError::AckBeyondEnd { up_to, last: self.next_seq - 1 });
        }
        if up_to > self.acked {
            // The watermark is on disk before any segment it covers is deleted.
            self.ack_file.store(up_to)?;
            self.acked = up_to;
        }
        self.delete_acked_segments()
    }

    /// A reader of the entries from `from_seq` on that were written when this is called
    /// (entries still buffered by [`append`](Wal::append) are not included: [`flush`](Wal::flush)
    /// or [`sync`](Wal::sync) first). It reads from disk independently of later appends.
    pub fn read_from(&self, from_seq: u64) -> Reader {
        let mut plans: Vec<SegmentPlan> = self
            .segments
            .iter()
            .map(|s| SegmentPlan { path: s.path.clone(), runs: s.runs.clone() })
            .collect();
        let end_seq = self.written_end();
        if let Some(active) = &self.active {
            plans.push(SegmentPlan { path: active.path.clone(), runs: active.runs.clone() });
        }
        Reader::new(plans, from_seq, end_seq)
    }

    /// Bytes the log takes on disk, counting what is buffered (compared against `max_bytes`).
    pub fn used_bytes(&self) -> u64 {
        self.closed_bytes + self.active.as_ref().map_or(0, ActiveSegment::len)
    }

    /// One past the last entry written to the files, so readable by
    /// [`read_from`](Wal::read_from) (entries still buffered by [`append`](Wal::append) are not).
    pub fn written_end(&self) -> u64 {
        self.next_seq - self.active.as_ref().map_or(0, |active| active.pending_entries)
    }

    /// The sequence number the next append gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The acknowledged watermark.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The options the log was opened with.
    pub fn options(&self) -> &WalOptions {
        &self.options
    }

    fn check_usable(&self) -> Result<(), WalError> {
        if self.poisoned {
            Err(WalError::Poisoned)
        } else {
            Ok(())
        }
    }

    /// Closes `old`, the active segment taken out of `self` (written and fsynced first), and
    /// creates the next one. On error the log is as before (`old` put back), except that the
    /// old segment may already be closed.
    fn rotate(&mut self, old: Option<ActiveSegment>) -> Result<ActiveSegment, WalError> {
        if let Some(mut old) = old {
            let closed =
                old.flush(self.next_seq, &mut self.poisoned).and_then(|()| old.sync(&mut self.poisoned));
            if let Err(e) = closed {
                self.active = Some(old);
                return Err(e);
            }
            let runs = std::mem::take(&mut old.runs);
            self.closed_bytes += old.written;
            self.segments.push_back(Segment {
                first_seq: old.first_seq,
                path: old.path,
                bytes: old.written,
                runs,
            });
            if let Err(e) = self.delete_acked_segments() {
                tracing::warn!("write-ahead log: {e} (retried at the next acknowledgement)");
            }
        }
        let path = self.dir.join(segment_file_name(self.next_seq));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| WalError::io("create", &path, e))?;
        self.dir_needs_sync = true;
        let mut pending = Vec::with_capacity(WRITE_BUFFER_BYTES as usize);
        pending.extend_from_slice(&encode_segment_header(self.next_seq));
        Ok(ActiveSegment {
            first_seq: self.next_seq,
            path,
            file,
            written: 0,
            synced: 0,
            pending,
            pending_entries: 0,
            runs: Vec::new(),
        })
    }

    /// Deletes the closed segments whose entries are all acknowledged (oldest first).
    fn delete_acked_segments(&mut self) -> Result<(), WalError> {
        while let Some(oldest) = self.segments.front() {
            let end_seq = self
                .segments
                .get(1)
                .map(|s| s.first_seq)
                .or(self.active.as_ref().map(|a| a.first_seq))
                .unwrap_or(self.next_seq);
            if end_seq > self.acked.saturating_add(1) {
                break;
            }
            remove_segment(&oldest.path)?;
            self.closed_bytes -= oldest.bytes;
            self.segments.pop_front();
        }
        Ok(())
    }

    /// Deletes the active segment, every entry of which is acknowledged (to make room).
    fn discard_active(&mut self) -> Result<(), WalError> {
        if let Some(active) = &self.active {
            remove_segment(&active.path)?;
        }
        self.active = None;
        Ok(())
    }
}

/// The segment files in `dir`, oldest first; other files are left alone.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, WalError> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| WalError::io("list", dir, e))? {
        let entry = entry.map_err(|e| WalError::io("list", dir, e))?;
        if let Some(first_seq) = entry.file_name().to_str().and_then(parse_segment_file_name) {
            files.push((first_seq, entry.path()));
        }
    }
    files.sort_unstable_by_key(|(first_seq, _)| *first_seq);
    Ok(files)
}

/// Deletes a segment file; one already gone is fine.
fn remove_segment(path: &Path) -> Result<(), WalError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(WalError::io("delete", path, e)),
    }
}
