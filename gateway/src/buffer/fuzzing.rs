//! The fuzzing entry point over recovery: bytes in, a log directory written from them, and
//! every invariant of open, replay, append and acknowledge checked (a failed check panics).
//! Driven by `gateway/fuzz` (cargo-fuzz) and by the corpus regression test.
//!
//! Input layout (everything little-endian; a record cut short by the end of the input is
//! written with the bytes there are):
//!
//! ```text
//! byte 0      segment_bytes = 64 + 16 × this byte (so appends rotate at various sizes)
//! then records, each opening with a tag byte, kind = tag & 7:
//!   0, 6  segment file: first_seq (u64), len (u16), the file's bytes
//!   1, 7  the same, resealed: the header's and every frame's CRC32C recomputed, so that
//!         mutations of lengths and sequence numbers reach past the checksums
//!   2     ack file: len (u16), the file's bytes
//!   3     ack file of two slots: slot 0's 24 bytes, slot 1's 24 bytes, zero padded
//!   4     the same, with both slots' CRC32C recomputed
//!   5     a directory named as segment first_seq (u64): every read of it fails
//! ```
//!
//! [`directory_input`] turns a real log directory into such an input (the seed corpus).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::ack::ACK_FILE_NAME;
use super::format::{
    encode_frame, parse_segment_file_name, segment_file_name, FrameHeader, ACK_RECORD_LEN, ACK_SLOT_LEN,
    FRAME_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use super::{Corruption, CorruptionReason, Entry, Reader, Recovery, Repair, Wal, WalError, WalOptions};

const SEGMENT_RAW: u8 = 0;
const SEGMENT_RESEALED: u8 = 1;
const ACK_RAW: u8 = 2;
const ACK_SLOTS: u8 = 3;
const ACK_SLOTS_RESEALED: u8 = 4;
const SEGMENT_DIRECTORY: u8 = 5;

/// Far above anything an input can hold: `Full` is not what this target looks for.
const MAX_BYTES: u64 = 1 << 40;

/// Writes the log directory `data` describes into a scratch directory and checks recovery on
/// it: [`Wal::open`] returns a clean error or a log whose replay is consistent with what it
/// reported; opening again changes nothing; entries appended and synced are replayed after the
/// old ones; acknowledging one of them leaves exactly the rest to replay. Panics on any
/// violation.
pub fn segment_files(data: &[u8]) {
    let Some((&size, records)) = data.split_first() else { return };
    let options = WalOptions { segment_bytes: 64 + 16 * u64::from(size), max_bytes: MAX_BYTES };
    let scratch = ScratchDir::new();
    let has_directories = write_records(scratch.path(), records);
    check_recovery(scratch.path(), options, has_directories);
}

/// Encodes the log directory `dir` (segment files, segment-named directories, the ack file) as
/// an input for [`segment_files`], which will open it with `segment_bytes`.
pub fn directory_input(dir: &Path, segment_bytes: u64) -> io::Result<Vec<u8>> {
    let size = segment_bytes
        .checked_sub(64)
        .filter(|excess| excess % 16 == 0)
        .and_then(|excess| u8::try_from(excess / 16).ok())
        .ok_or_else(|| invalid("segment_bytes must be 64 + 16 × n for n < 256"))?;
    let mut out = vec![size];
    let mut names: Vec<_> = fs::read_dir(dir)?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        let path = dir.join(&name);
        if let Some(first_seq) = name.to_str().and_then(parse_segment_file_name) {
            if path.is_dir() {
                out.push(SEGMENT_DIRECTORY);
                out.extend_from_slice(&first_seq.to_le_bytes());
            } else {
                out.push(SEGMENT_RAW);
                out.extend_from_slice(&first_seq.to_le_bytes());
                push_with_len(&mut out, &fs::read(&path)?)?;
            }
        } else if name == ACK_FILE_NAME {
            let bytes = fs::read(&path)?;
            let slot = ACK_SLOT_LEN as usize;
            let only_slots = bytes.len() == 2 * slot
                && bytes[ACK_RECORD_LEN..slot].iter().all(|&b| b == 0)
                && bytes[slot + ACK_RECORD_LEN..].iter().all(|&b| b == 0);
            if only_slots {
                out.push(ACK_SLOTS);
                out.extend_from_slice(&bytes[..ACK_RECORD_LEN]);
                out.extend_from_slice(&bytes[slot..slot + ACK_RECORD_LEN]);
            } else {
                out.push(ACK_RAW);
                push_with_len(&mut out, &bytes)?;
            }
        }
    }
    Ok(out)
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

fn push_with_len(out: &mut Vec<u8>, bytes: &[u8]) -> io::Result<()> {
    let len = u16::try_from(bytes.len()).map_err(|_| invalid("a file of the input is over 64 KiB"))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

/// The input's records, read front to back.
struct Records<'a>(&'a [u8]);

impl<'a> Records<'a> {
    /// Up to `n` bytes (fewer at the end of the input).
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (taken, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        taken
    }

    fn u64(&mut self) -> Option<u64> {
        let bytes: [u8; 8] = self.take(8).try_into().ok()?;
        Some(u64::from_le_bytes(bytes))
    }

    fn sized(&mut self) -> Option<&'a [u8]> {
        let len: [u8; 2] = self.take(2).try_into().ok()?;
        Some(self.take(usize::from(u16::from_le_bytes(len))))
    }
}

/// Writes the files `records` describes into `dir`; true when it made a segment-named directory.
fn write_records(dir: &Path, records: &[u8]) -> bool {
    let mut records = Records(records);
    let mut has_directories = false;
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        // A directory of the same name from an earlier record stays; the file is then not written.
        if !path.is_dir() {
            fs::write(path, bytes).expect("write a scratch file");
        }
    };
    while let &[tag] = records.take(1) {
        match tag & 7 {
            kind @ (SEGMENT_RAW | SEGMENT_RESEALED | 6 | 7) => {
                let (Some(first_seq), Some(bytes)) = (records.u64(), records.sized()) else { break };
                let mut bytes = bytes.to_vec();
                if kind & 1 == 1 {
                    reseal_segment(&mut bytes);
                }
                write(&segment_file_name(first_seq), &bytes);
            }
            ACK_RAW => {
                let Some(bytes) = records.sized() else { break };
                write(ACK_FILE_NAME, bytes);
            }
            kind @ (ACK_SLOTS | ACK_SLOTS_RESEALED) => {
                let slot = ACK_SLOT_LEN as usize;
                let mut bytes = vec![0u8; 2 * slot];
                let first = records.take(ACK_RECORD_LEN);
                bytes[..first.len()].copy_from_slice(first);
                let second = records.take(ACK_RECORD_LEN);
                bytes[slot..slot + second.len()].copy_from_slice(second);
                if kind == ACK_SLOTS_RESEALED {
                    reseal_crc(&mut bytes[..ACK_RECORD_LEN]);
                    reseal_crc(&mut bytes[slot..slot + ACK_RECORD_LEN]);
                }
                write(ACK_FILE_NAME, &bytes);
            }
            _ => {
                let Some(first_seq) = records.u64() else { break };
                let path = dir.join(segment_file_name(first_seq));
                let _ = fs::remove_file(&path);
                fs::create_dir_all(&path).expect("create a scratch directory");
                has_directories = true;
            }
        }
    }
    has_directories
}

/// Sets the CRC32C in the last 4 bytes of a 24-byte segment header or ack record to that of
/// the 20 bytes before (the layout both share, see `format.rs`).
fn reseal_crc(record: &mut [u8]) {
    let crc = crc32c::crc32c(&record[..20]);
    record[20..24].copy_from_slice(&crc.to_le_bytes());
}

/// Recomputes the header checksum and the checksum of every frame that the lengths delimit,
/// keeping whatever lengths, sequence numbers and payloads the input has.
fn reseal_segment(bytes: &mut [u8]) {
    let header_len = SEGMENT_HEADER_LEN as usize;
    if bytes.len() < header_len {
        return;
    }
    reseal_crc(&mut bytes[..header_len]);
    let mut pos = header_len;
    let mut frame = Vec::new();
    while let Some(header) = bytes.get(pos..pos + FRAME_HEADER_LEN as usize) {
        let header = FrameHeader::decode(header.try_into().expect("16 bytes"));
        let payload_start = pos + FRAME_HEADER_LEN as usize;
        let Some(payload) = bytes.get(payload_start..payload_start + header.len as usize) else { break };
        frame.clear();
        encode_frame(header.seq, payload, &mut frame);
        bytes[pos..pos + frame.len()].copy_from_slice(&frame);
        pos += frame.len();
    }
}

/// A fresh directory for one execution (on tmpfs when there is one, for speed), removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() { base.to_path_buf() } else { std::env::temp_dir() };
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = base.join(format!("weir-wal-fuzz-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create the scratch directory");
        ScratchDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Whether an error is one an input may legitimately cause; panics otherwise. A segment-named
/// directory cannot be deleted like a file (once it is wholly acknowledged, say): that failure
/// is the simulation's, not the log's.
fn assert_clean_error(error: &WalError, has_directories: bool, what: &str) {
    match error {
        WalError::UnsupportedVersion { .. } if what == "open" => {}
        WalError::Io { op: "delete", .. } if has_directories => {}
        other => panic!("{what}: unexpected error {other:?}"),
    }
}

/// Opens the log, or returns `None` after checking that the error is a clean one.
fn open(dir: &Path, options: WalOptions, has_directories: bool, what: &str) -> Option<(Wal, Recovery)> {
    Wal::open(dir, options).map_err(|error| assert_clean_error(&error, has_directories, what)).ok()
}

/// Reads a replay to the end: every item is an entry (the files did not change since the
/// open), in strictly increasing sequence order, all after the watermark.
fn drain(replay: Reader, acked: u64) -> Vec<Entry> {
    let mut entries: Vec<Entry> = Vec::new();
    for item in replay {
        let entry = item.unwrap_or_else(|e| panic!("replay of an unchanged log failed: {e}"));
        assert!(entry.seq > acked, "entry {} replayed at or below the watermark {acked}", entry.seq);
        if let Some(last) = entries.last() {
            assert!(entry.seq > last.seq, "entry {} replayed after {}", entry.seq, last.seq);
        }
        entries.push(entry);
    }
    entries
}

/// Checks what one open reported against its own replay; returns the replay.
fn replay_consistent(wal: &Wal, recovery: Recovery) -> Vec<Entry> {
    assert_eq!((wal.acked(), wal.next_seq()), (recovery.acked, recovery.next_seq));
    // At the very end of the sequence space (a forged watermark) appending is refused instead.
    assert!(
        recovery.next_seq > recovery.acked || recovery.next_seq == u64::MAX,
        "next {} not past acked {}",
        recovery.next_seq,
        recovery.acked
    );
    let entries = drain(recovery.replay, recovery.acked);
    assert_eq!(entries.len() as u64, recovery.replay_entries, "replay_entries");
    let bytes: u64 = entries.iter().map(|e| e.payload.len() as u64).sum();
    assert_eq!(bytes, recovery.replay_bytes, "replay_bytes");
    if let Some(last) = entries.last() {
        assert!(last.seq < recovery.next_seq, "entry {} replayed, next_seq {}", last.seq, recovery.next_seq);
    }
    entries
}

/// Where and why damage was skipped over in place, which every open reports again. The
/// sequences lost with it may differ: the first open can bound them by a next segment that it
/// then deletes (one holding no entry), the next open cannot.
fn damage_skipped_in_place(corruptions: &[Corruption]) -> Vec<(PathBuf, u64, u64, CorruptionReason)> {
    corruptions
        .iter()
        .filter(|c| c.repair == Repair::Skipped)
        .map(|c| (c.file.clone(), c.offset, c.skipped_bytes, c.reason.clone()))
        .collect()
}

fn check_recovery(dir: &Path, options: WalOptions, has_directories: bool) {
    // Only the first open may fail on what the directory holds (an unsupported version).
    let Some((wal, first)) = open(dir, options, has_directories, "open") else { return };
    let skipped = damage_skipped_in_place(&first.corruptions);
    let first_corruptions = first.corruptions.clone();
    let old = replay_consistent(&wal, first);
    let (acked, next_seq) = (wal.acked(), wal.next_seq());
    drop(wal);

    // Idempotent: the same entries, and only the damage skipped in place reported again.
    let Some((mut wal, second)) = open(dir, options, has_directories, "second open") else { return };
    assert!(second.deleted_segments.is_empty(), "second open deleted {:?}", second.deleted_segments);
    assert!(second.corruptions.iter().all(|c| c.repair == Repair::Skipped), "{:?}", second.corruptions);
    assert_eq!(
        damage_skipped_in_place(&second.corruptions),
        skipped,
        "second open; the first reported {first_corruptions:?}"
    );
    assert_eq!(replay_consistent(&wal, second), old, "second open");
    assert_eq!((wal.acked(), wal.next_seq()), (acked, next_seq), "second open");

    // New entries go after the old ones, whatever the directory held.
    let max_entry = options.max_entry_bytes();
    let mut appended = Vec::new();
    for (i, len) in [0, 1, max_entry.min(100)].into_iter().enumerate() {
        let payload = vec![0xa0 + i as u8; len as usize];
        let expected = next_seq + i as u64; // the previous append got expected - 1 < u64::MAX
        match wal.append(&payload) {
            Ok(seq) => {
                assert_eq!(seq, expected, "append {i}");
                appended.push(Entry { seq, payload });
            }
            // u64::MAX is never handed out: one past the last entry must be representable.
            Err(WalError::SequenceExhausted) if expected == u64::MAX => break,
            Err(e) => panic!("append {i} (next {expected}): {e:?}"),
        }
    }
    wal.sync().expect("sync");
    drop(wal);
    let Some((mut wal, third)) = open(dir, options, has_directories, "open after appending") else { return };
    let all: Vec<Entry> = old.iter().chain(&appended).cloned().collect();
    assert_eq!(replay_consistent(&wal, third), all, "open after appending");
    if appended.is_empty() {
        return;
    }

    // Acknowledging the first new entry leaves exactly the other new ones to replay.
    if let Err(error) = wal.ack(appended[0].seq) {
        assert_clean_error(&error, has_directories, "ack");
        return;
    }
    drop(wal);
    let Some((wal, fourth)) = open(dir, options, has_directories, "open after acknowledging") else { return };
    assert_eq!(fourth.acked, appended[0].seq);
    assert_eq!(replay_consistent(&wal, fourth), appended[1..], "open after acknowledging");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reseal_makes_frames_verify() {
        let mut bytes = vec![0u8; 24];
        encode_frame(7, b"abc", &mut bytes);
        bytes[4] ^= 0xff; // frame CRC
        bytes[21] ^= 0xff; // header CRC
        reseal_segment(&mut bytes);
        assert_eq!(crc32c::crc32c(&bytes[..20]).to_le_bytes(), bytes[20..24]);
        let header = FrameHeader::decode(bytes[24..40].try_into().unwrap());
        assert!(header.verifies(&bytes[40..]));
    }

    #[test]
    fn a_real_directory_round_trips_through_an_input() {
        let dir = tempfile::tempdir().unwrap();
        let options = WalOptions { segment_bytes: 64 + 16 * 4, max_bytes: 1 << 20 };
        let (mut wal, _) = Wal::open(dir.path(), options).unwrap();
        for i in 0..7u8 {
            wal.append(&[i; 20]).unwrap();
        }
        wal.sync().unwrap();
        wal.ack(2).unwrap();
        drop(wal);
        let input = directory_input(dir.path(), options.segment_bytes).unwrap();
        assert_eq!(input[0], 4);

        let copy = tempfile::tempdir().unwrap();
        write_records(copy.path(), &input[1..]);
        let listing = |dir: &Path| {
            let mut files: Vec<_> = fs::read_dir(dir)
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    (e.file_name(), fs::read(e.path()).unwrap())
                })
                .collect();
            files.sort();
            files
        };
        assert_eq!(listing(copy.path()), listing(dir.path()));
        segment_files(&input);
    }

    #[test]
    fn short_and_empty_inputs_are_fine() {
        segment_files(&[]);
        segment_files(&[0]);
        segment_files(&[0, SEGMENT_RAW, 1, 0]);
        segment_files(&[255, ACK_SLOTS_RESEALED, b'w']);
    }
}
