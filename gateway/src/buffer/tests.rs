//! Whole-log tests: crash recovery, damage, acknowledgement, full disks, and a model test.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::ack::AckFile;
use super::format::{self, parse_segment_file_name};
use super::*;

/// 20-byte payloads make 36-byte frames: four fill a 168-byte segment (24-byte header).
const PAYLOAD: usize = 20;
const FOUR_ENTRIES: u64 = 24 + 4 * 36;

fn options(segment_bytes: u64, max_bytes: u64) -> WalOptions {
    WalOptions { segment_bytes, max_bytes }
}

fn payload(seq: u64, len: usize) -> Vec<u8> {
    let mut bytes = format!("entry {seq};").into_bytes();
    bytes.resize(len, b'.');
    bytes
}

/// Collects a replay, failing on any error.
fn entries(reader: Reader) -> Vec<Entry> {
    reader.collect::<Result<Vec<_>, _>>().expect("replay")
}

fn seqs(entries: &[Entry]) -> Vec<u64> {
    entries.iter().map(|e| e.seq).collect()
}

/// Segment files in `dir`, oldest first: (first sequence, path, length).
fn segment_files(dir: &Path) -> Vec<(u64, PathBuf, u64)> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let first = parse_segment_file_name(e.file_name().to_str()?)?;
            Some((first, e.path(), e.metadata().unwrap().len()))
        })
        .collect();
    files.sort();
    files
}

fn disk_bytes(dir: &Path) -> u64 {
    segment_files(dir).iter().map(|(_, _, len)| len).sum()
}

/// A log in `dir` holding entries 1..=count (PAYLOAD bytes each), synced, then closed.
fn write_log(dir: &Path, wal_options: WalOptions, count: u64) {
    let (mut wal, _) = Wal::open(dir, wal_options).unwrap();
    for seq in 1..=count {
        assert_eq!(wal.append(&payload(seq, PAYLOAD)).unwrap(), seq);
    }
    wal.sync().unwrap();
}

fn flip_bit(path: &Path, offset: u64, mask: u8) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset as usize] ^= mask;
    fs::write(path, bytes).unwrap();
}

#[test]
fn appended_and_synced_entries_replay_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (mut wal, recovery) = Wal::open(dir.path(), options(256, 1 << 20)).unwrap();
    assert_eq!((recovery.acked, recovery.next_seq, recovery.replay_entries), (0, 1, 0));
    let mut expected = Vec::new();
    for seq in 1..=100 {
        let payload = payload(seq, (seq as usize * 7) % 90);
        assert_eq!(wal.append(&payload).unwrap(), seq);
        expected.push(Entry { seq, payload });
    }
    wal.sync().unwrap();
    assert_eq!(wal.used_bytes(), disk_bytes(dir.path()));
    assert!(segment_files(dir.path()).len() > 10, "rotated");
    assert!(segment_files(dir.path()).iter().all(|(_, _, len)| *len <= 256));
    drop(wal);

    let (wal, recovery) = Wal::open(dir.path(), options(256, 1 << 20)).unwrap();
    assert_eq!(recovery.corruptions, []);
    assert_eq!(recovery.replay_entries, 100);
    assert_eq!(recovery.replay_bytes, expected.iter().map(|e| e.payload.len() as u64).sum::<u64>());
    assert_eq!(entries(recovery.replay), expected);
    assert_eq!(wal.next_seq(), 101);
    assert_eq!(wal.used_bytes(), disk_bytes(dir.path()));
}

#[test]
fn unsynced_entries_may_be_lost_but_the_log_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (mut wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    for seq in 1..=5 {
        wal.append(&payload(seq, PAYLOAD)).unwrap();
    }
    wal.sync().unwrap();
    for seq in 6..=8 {
        wal.append(&payload(seq, PAYLOAD)).unwrap();
    }
    drop(wal); // a crash: the buffered entries were never written

    let (mut wal, recovery) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    assert_eq!(seqs(&entries(recovery.replay)), [1, 2, 3, 4, 5]);
    assert_eq!(recovery.corruptions, []);
    assert_eq!(wal.append(b"next").unwrap(), 6);
    wal.sync().unwrap();
    drop(wal);
    let (_, recovery) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    let replayed = entries(recovery.replay);
    assert_eq!(seqs(&replayed), [1, 2, 3, 4, 5, 6]);
    assert_eq!(replayed[5].payload, b"next");
}

/// Cuts the newest segment at every byte offset: each complete entry is kept, the torn one is
/// reported and truncated (or the segment deleted when nothing in it survives), and a second
/// open gives the same entries with nothing left to report.
#[test]
fn torn_tail_at_every_offset() {
    let source = tempfile::tempdir().unwrap();
    write_log(source.path(), options(FOUR_ENTRIES, 1 << 20), 6); // segments 1..=4 and 5..=6
    let files = segment_files(source.path());
    assert_eq!(files.iter().map(|f| f.0).collect::<Vec<_>>(), [1, 5]);
    let (newest_first, newest_path, newest_len) = files[1].clone();
    let newest = fs::read(&newest_path).unwrap();
    let ack = fs::read(source.path().join("ack")).unwrap();
    let frame_ends = [24, 24 + 36, 24 + 72];
    assert_eq!(newest_len, 24 + 72);

    for cut in 0..newest_len {
        let dir = tempfile::tempdir().unwrap();
        fs::copy(&files[0].1, dir.path().join(files[0].1.file_name().unwrap())).unwrap();
        fs::write(dir.path().join("ack"), &ack).unwrap();
        let path = dir.path().join(newest_path.file_name().unwrap());
        fs::write(&path, &newest[..cut as usize]).unwrap();

        let (wal, recovery) = Wal::open(dir.path(), options(FOUR_ENTRIES, 1 << 20)).unwrap();
        let kept = frame_ends.iter().filter(|&&end| end <= cut && end > 24).count() as u64;
        let expected: Vec<u64> = (1..newest_first + kept).collect();
        let replayed = entries(recovery.replay);
        assert_eq!(seqs(&replayed), expected, "cut at {cut}");
        assert!(replayed.iter().all(|e| e.payload == payload(e.seq, PAYLOAD)));
        assert_eq!(wal.next_seq(), newest_first + kept, "cut at {cut}");

        let at_boundary = frame_ends.contains(&cut);
        if at_boundary {
            assert_eq!(recovery.corruptions, [], "cut at {cut}");
        } else {
            assert_eq!(recovery.corruptions.len(), 1, "cut at {cut}: {:?}", recovery.corruptions);
            let c = &recovery.corruptions[0];
            let torn_from = frame_ends.iter().copied().filter(|&end| end <= cut).max().unwrap_or(0);
            assert_eq!(c.file, path);
            assert_eq!(c.offset, torn_from, "cut at {cut}");
            assert_eq!(c.skipped_bytes, cut - torn_from, "cut at {cut}");
            let expected_reason = if cut < 24 {
                CorruptionReason::TornHeader
            } else {
                CorruptionReason::PartialEntry {
                    needed: if cut - torn_from < 16 { 16 } else { 36 },
                    available: cut - torn_from,
                }
            };
            assert_eq!(c.reason, expected_reason, "cut at {cut}");
            assert_eq!(c.repair, if kept == 0 { Repair::Deleted } else { Repair::Truncated }, "cut at {cut}");
        }
        if kept == 0 {
            assert!(!path.exists(), "cut at {cut}: a segment with nothing to replay is deleted");
        } else {
            assert_eq!(fs::metadata(&path).unwrap().len(), frame_ends[kept as usize]);
        }
        drop(wal);

        let (_, again) = Wal::open(dir.path(), options(FOUR_ENTRIES, 1 << 20)).unwrap();
        assert_eq!(again.corruptions, [], "cut at {cut}: repaired by the first open");
        assert_eq!(seqs(&entries(again.replay)), expected, "cut at {cut}: idempotent");
    }
}

#[test]
fn damaged_payload_in_a_middle_segment_costs_one_entry() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), options(FOUR_ENTRIES, 1 << 20), 12); // 1..=4, 5..=8, 9..=12
    let middle = segment_files(dir.path())[1].1.clone();
    flip_bit(&middle, 24 + 36 + 16 + 3, 0x04); // payload of entry 6

    for _ in 0..2 {
        let (wal, recovery) = Wal::open(dir.path(), options(FOUR_ENTRIES, 1 << 20)).unwrap();
        assert_eq!(recovery.corruptions.len(), 1, "{:?}", recovery.corruptions);
        let c = &recovery.corruptions[0];
        assert_eq!((c.file.as_path(), c.offset, c.skipped_bytes), (middle.as_path(), 60, 36));
        assert_eq!((c.reason.clone(), c.lost_seqs.clone()), (CorruptionReason::ChecksumMismatch, Some(6..7)));
        assert_eq!(c.repair, Repair::Skipped, "left in place, reported again");
        assert_eq!(recovery.replay_entries, 11);
        assert_eq!(seqs(&entries(recovery.replay)), [1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12]);
        assert_eq!(wal.next_seq(), 13);
    }
}

#[test]
fn damaged_length_in_a_middle_segment_skips_to_the_next_segment() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), options(FOUR_ENTRIES, 1 << 20), 12);
    let middle = segment_files(dir.path())[1].1.clone();
    flip_bit(&middle, 24 + 36 + 1, 0x40); // length of entry 6

    let (_, recovery) = Wal::open(dir.path(), options(FOUR_ENTRIES, 1 << 20)).unwrap();
    assert_eq!(recovery.corruptions.len(), 1);
    let c = &recovery.corruptions[0];
    assert_eq!((c.offset, c.skipped_bytes, c.lost_seqs.clone()), (60, FOUR_ENTRIES - 60, Some(6..9)));
    assert!(matches!(c.reason, CorruptionReason::PartialEntry { .. }), "{:?}", c.reason);
    assert_eq!(fs::metadata(&middle).unwrap().len(), FOUR_ENTRIES, "a middle segment is not truncated");
    assert_eq!(seqs(&entries(recovery.replay)), [1, 2, 3, 4, 5, 9, 10, 11, 12]);
}

#[test]
fn garbage_instead_of_a_segment() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), options(FOUR_ENTRIES, 1 << 20), 12);
    let middle = segment_files(dir.path())[1].1.clone();
    fs::write(&middle, vec![0xa5; FOUR_ENTRIES as usize]).unwrap();

    let (mut wal, recovery) = Wal::open(dir.path(), options(FOUR_ENTRIES, 1 << 20)).unwrap();
    let reasons: Vec<_> = recovery.corruptions.iter().map(|c| c.reason.clone()).collect();
    assert_eq!(reasons[0], CorruptionReason::BadHeader);
    assert_eq!(recovery.corruptions[1].lost_seqs, Some(5..9));
    assert_eq!(seqs(&entries(recovery.replay)), [1, 2, 3, 4, 9, 10, 11, 12]);
    // Once acknowledged past, the damaged segment is deleted like any other.
    wal.ack(10).unwrap();
    assert!(!middle.exists());
}

/// A segment that cannot be read (here a directory by a segment's name: every read fails, as
/// on a bad sector) is reported and skipped, not truncated or deleted, and numbering goes past
/// anything it could hold; opening never fails on it.
#[test]
fn unreadable_segments_are_reported_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), options(FOUR_ENTRIES, 1 << 20), 4); // segment 1..=4
    let newest = dir.path().join("00000000000000000005.wal");
    fs::create_dir(&newest).unwrap();
    let len = fs::metadata(&newest).unwrap().len();
    let next = 5 + len.saturating_sub(24) / 16 + 1;
    let (mut wal, recovery) = Wal::open(dir.path(), options(FOUR_ENTRIES, 1 << 20)).unwrap();
    assert_eq!(recovery.corruptions.len(), 1, "{:?}", recovery.corruptions);
    let c = &recovery.corruptions[0];
    assert_eq!((c.file.as_path(), c.repair), (newest.as_path(), Repair::Skipped));
    assert!(matches!(c.reason, CorruptionReason::Unreadable { .. }), "{c:?}");
    assert_eq!(seqs(&entries(recovery.replay)), [1, 2, 3, 4]);
    assert_eq!(wal.next_seq(), next);
    assert_eq!(wal.append(b"after").unwrap(), next);
    wal.sync().unwrap();
    drop(wal);

    // Reported again (it is still there); now a middle segment, bounded by the next one.
    let (wal, recovery) = Wal::open(dir.path(), options(FOUR_ENTRIES, 1 << 20)).unwrap();
    assert_eq!(recovery.corruptions.len(), 1, "{:?}", recovery.corruptions);
    assert_eq!(recovery.corruptions[0].lost_seqs, Some(5..next));
    assert_eq!(seqs(&entries(recovery.replay)), [1, 2, 3, 4, next]);
    assert_eq!(wal.next_seq(), next + 1);
}

#[test]
fn ack_deletes_whole_acknowledged_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (mut wal, _) = Wal::open(dir.path(), options(FOUR_ENTRIES, 1 << 20)).unwrap();
    for seq in 1..=14 {
        wal.append(&payload(seq, PAYLOAD)).unwrap();
    }
    wal.sync().unwrap();
    let firsts = |dir: &Path| segment_files(dir).iter().map(|f| f.0).collect::<Vec<_>>();
    assert_eq!(firsts(dir.path()), [1, 5, 9, 13]);

    wal.ack(3).unwrap();
    assert_eq!(firsts(dir.path()), [1, 5, 9, 13], "segment 1..=4 is not wholly acknowledged");
    wal.ack(4).unwrap();
    assert_eq!(firsts(dir.path()), [5, 9, 13]);
    wal.ack(2).unwrap(); // lower: no-op
    assert_eq!(wal.acked(), 4);
    wal.ack(12).unwrap();
    assert_eq!(firsts(dir.path()), [13], "the active segment stays");
    assert_eq!(wal.used_bytes(), disk_bytes(dir.path()));
    assert!(matches!(wal.ack(15), Err(WalError::AckBeyondEnd { up_to: 15, last: 14 })));
    drop(wal);

    let (wal, recovery) = Wal::open(dir.path(), options(FOUR_ENTRIES, 1 << 20)).unwrap();
    assert_eq!(recovery.acked, 12);
    assert_eq!(seqs(&entries(recovery.replay)), [13, 14]);
    assert_eq!(wal.next_seq(), 15);
}

#[test]
fn crash_between_watermark_and_unlink() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), options(FOUR_ENTRIES, 1 << 20), 14);
    let before = segment_files(dir.path());
    // What `ack(9)` does before deleting anything: persist the watermark. Then the crash.
    let (mut ack, _) = AckFile::open(dir.path()).unwrap();
    ack.store(9).unwrap();
    drop(ack);

    let (wal, recovery) = Wal::open(dir.path(), options(FOUR_ENTRIES, 1 << 20)).unwrap();
    assert_eq!(recovery.acked, 9);
    assert_eq!(recovery.deleted_segments, [before[0].1.clone(), before[1].1.clone()]);
    assert_eq!(recovery.corruptions, []);
    assert_eq!(seqs(&entries(recovery.replay)), [10, 11, 12, 13, 14]);
    assert_eq!(segment_files(dir.path()).iter().map(|f| f.0).collect::<Vec<_>>(), [9, 13]);
    assert_eq!(wal.used_bytes(), disk_bytes(dir.path()));
    drop(wal);

    let (_, again) = Wal::open(dir.path(), options(FOUR_ENTRIES, 1 << 20)).unwrap();
    assert_eq!(again.deleted_segments, Vec::<PathBuf>::new());
    assert_eq!(seqs(&entries(again.replay)), [10, 11, 12, 13, 14]);
}

#[test]
fn everything_acknowledged_before_a_crash_replays_nothing() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), options(FOUR_ENTRIES, 1 << 20), 6);
    let (mut ack, _) = AckFile::open(dir.path()).unwrap();
    ack.store(6).unwrap();
    drop(ack);
    let (mut wal, recovery) = Wal::open(dir.path(), options(FOUR_ENTRIES, 1 << 20)).unwrap();
    assert_eq!(recovery.deleted_segments.len(), 2);
    assert_eq!(recovery.replay_entries, 0);
    assert_eq!(entries(recovery.replay), []);
    assert_eq!(segment_files(dir.path()), []);
    assert_eq!(wal.append(b"x").unwrap(), 7, "sequence numbers never go back past the watermark");
}

#[test]
fn acknowledged_beyond_what_reached_the_disk() {
    // Entries delivered from memory and acknowledged, then lost unsynced in a crash.
    let dir = tempfile::tempdir().unwrap();
    let (mut wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    for seq in 1..=3 {
        wal.append(&payload(seq, PAYLOAD)).unwrap();
    }
    wal.sync().unwrap();
    for seq in 4..=6 {
        wal.append(&payload(seq, PAYLOAD)).unwrap();
    }
    wal.ack(5).unwrap();
    drop(wal);
    let (mut wal, recovery) = Wal::open(dir.path(), WalOptions::default()).unwrap();
    assert_eq!(recovery.acked, 5);
    assert_eq!(entries(recovery.replay), []);
    assert_eq!(wal.append(b"x").unwrap(), 6);
}

#[test]
fn full_then_resume_after_ack() {
    let dir = tempfile::tempdir().unwrap();
    let (mut wal, _) = Wal::open(dir.path(), options(FOUR_ENTRIES, 2 * FOUR_ENTRIES)).unwrap();
    for seq in 1..=8 {
        wal.append(&payload(seq, PAYLOAD)).unwrap();
    }
    let full = wal.append(&payload(9, PAYLOAD));
    match full {
        Err(WalError::Full { used, max }) => assert_eq!((used, max), (2 * FOUR_ENTRIES, 2 * FOUR_ENTRIES)),
        other => panic!("expected Full, got {other:?}"),
    }
    assert!(full.unwrap_err().is_no_room());
    assert_eq!(wal.next_seq(), 9, "a refused append uses no sequence number");
    wal.sync().unwrap();
    assert_eq!(wal.used_bytes(), disk_bytes(dir.path()));

    wal.ack(4).unwrap();
    assert_eq!(wal.append(&payload(9, PAYLOAD)).unwrap(), 9);
    wal.sync().unwrap();
    drop(wal);
    let (_, recovery) = Wal::open(dir.path(), options(FOUR_ENTRIES, 2 * FOUR_ENTRIES)).unwrap();
    assert_eq!(seqs(&entries(recovery.replay)), [5, 6, 7, 8, 9]);
}

#[test]
fn a_wholly_acknowledged_active_segment_is_reclaimed_when_full() {
    let dir = tempfile::tempdir().unwrap();
    let (mut wal, _) = Wal::open(dir.path(), options(FOUR_ENTRIES, FOUR_ENTRIES)).unwrap();
    for seq in 1..=4 {
        wal.append(&payload(seq, PAYLOAD)).unwrap();
    }
    assert!(matches!(wal.append(b"5"), Err(WalError::Full { .. })));
    wal.ack(3).unwrap();
    assert!(matches!(wal.append(b"5"), Err(WalError::Full { .. })), "entry 4 is not acknowledged");
    wal.ack(4).unwrap();
    assert_eq!(wal.append(b"5").unwrap(), 5);
    wal.sync().unwrap();
    assert_eq!(segment_files(dir.path()).iter().map(|f| f.0).collect::<Vec<_>>(), [5]);
    assert_eq!(wal.used_bytes(), disk_bytes(dir.path()));
}

#[test]
fn entry_and_option_limits() {
    let dir = tempfile::tempdir().unwrap();
    let (mut wal, _) = Wal::open(dir.path(), options(100, 1000)).unwrap();
    assert_eq!(wal.options().max_entry_bytes(), 60);
    assert_eq!(wal.append(&[7; 60]).unwrap(), 1);
    assert!(matches!(wal.append(&[7; 61]), Err(WalError::EntryTooLarge { len: 61, max: 60 })));
    assert!(matches!(Wal::open(dir.path(), options(10, 1000)), Err(WalError::InvalidOptions(_))));
    assert!(matches!(Wal::open(dir.path(), options(100, 99)), Err(WalError::InvalidOptions(_))));
}

#[test]
fn read_from_a_live_log() {
    let dir = tempfile::tempdir().unwrap();
    let (mut wal, _) = Wal::open(dir.path(), options(FOUR_ENTRIES, 1 << 20)).unwrap();
    for seq in 1..=10 {
        wal.append(&payload(seq, PAYLOAD)).unwrap();
    }
    let reader = wal.read_from(1);
    assert_eq!(reader.end_seq(), 9, "entries 9 and 10 are still buffered in the active segment");
    assert_eq!(seqs(&entries(reader)), [1, 2, 3, 4, 5, 6, 7, 8]);
    wal.flush().unwrap();
    let reader = wal.read_from(6);
    assert_eq!(reader.end_seq(), 11);
    let read = entries(reader);
    assert_eq!(seqs(&read), [6, 7, 8, 9, 10]);
    assert!(read.iter().all(|e| e.payload == payload(e.seq, PAYLOAD)));

    // Segments deleted after the snapshot (acknowledged) are skipped, not an error.
    let reader = wal.read_from(1);
    wal.ack(8).unwrap();
    assert_eq!(seqs(&entries(reader)), [9, 10]);
}

#[test]
fn damage_after_open_is_reported_by_the_reader_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), options(FOUR_ENTRIES, 1 << 20), 12);
    let (wal, recovery) = Wal::open(dir.path(), options(FOUR_ENTRIES, 1 << 20)).unwrap();
    drop(recovery);
    let middle = segment_files(dir.path())[1].1.clone();
    flip_bit(&middle, 24 + 16, 0x01); // payload of entry 5

    let mut reader = wal.read_from(1);
    let mut got = Vec::new();
    let mut damage = Vec::new();
    for item in &mut reader {
        match item {
            Ok(entry) => got.push(entry.seq),
            Err(WalError::Corrupt(c)) => damage.push(c),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(got, [1, 2, 3, 4, 9, 10, 11, 12]);
    assert_eq!(damage.len(), 1);
    assert_eq!((damage[0].offset, damage[0].lost_seqs.clone()), (24, Some(5..9)));
    assert_eq!(damage[0].reason, CorruptionReason::ChecksumMismatch);
}

#[test]
fn damaged_ack_file_replays_from_the_first_segment() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), options(FOUR_ENTRIES, 1 << 20), 12);
    {
        let (mut wal, _) = Wal::open(dir.path(), options(FOUR_ENTRIES, 1 << 20)).unwrap();
        wal.ack(6).unwrap();
    }
    fs::write(dir.path().join("ack"), b"garbage").unwrap();
    let (_, recovery) = Wal::open(dir.path(), options(FOUR_ENTRIES, 1 << 20)).unwrap();
    assert_eq!(recovery.corruptions.len(), 1);
    assert_eq!(recovery.corruptions[0].reason, CorruptionReason::AckFileCorrupt);
    assert_eq!(recovery.acked, 4, "everything in the first remaining segment is replayed again");
    assert_eq!(seqs(&entries(recovery.replay)), [5, 6, 7, 8, 9, 10, 11, 12]);
    let (_, again) = Wal::open(dir.path(), options(FOUR_ENTRIES, 1 << 20)).unwrap();
    assert_eq!(again.corruptions, [], "the ack file was rewritten");
    assert_eq!(again.acked, 4);
}

/// Fuzzing found this (`gateway/fuzz`, input `regression-sequence-overflow-on-append`): a
/// directory whose segment name or watermark is near u64::MAX made `append` overflow
/// `next_seq`. Now the last sequence number handed out is u64::MAX - 1, and then appending is
/// refused without touching the log.
#[test]
fn sequence_overflow_on_append() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ack, _) = AckFile::open(dir.path()).unwrap();
    ack.store(u64::MAX - 2).unwrap();
    drop(ack);
    let (mut wal, recovery) = Wal::open(dir.path(), options(FOUR_ENTRIES, 1 << 20)).unwrap();
    assert_eq!((recovery.acked, recovery.next_seq), (u64::MAX - 2, u64::MAX - 1));
    assert_eq!(wal.append(b"last").unwrap(), u64::MAX - 1);
    assert!(matches!(wal.append(b"one more"), Err(WalError::SequenceExhausted)));
    assert_eq!(wal.next_seq(), u64::MAX);
    wal.sync().unwrap();
    drop(wal);

    let (mut wal, recovery) = Wal::open(dir.path(), options(FOUR_ENTRIES, 1 << 20)).unwrap();
    assert_eq!(entries(recovery.replay), [Entry { seq: u64::MAX - 1, payload: b"last".to_vec() }]);
    assert!(matches!(wal.append(b"one more"), Err(WalError::SequenceExhausted)));
    wal.ack(u64::MAX - 1).unwrap();
    assert!(segment_files(dir.path()).len() <= 1, "only the active segment may stay");
}

/// Fuzzing found this (input `regression-sequence-overflow-past-an-unreadable-segment`):
/// numbering past an unreadable newest segment named near u64::MAX overflowed in `Wal::open`.
#[test]
fn sequence_overflow_past_an_unreadable_segment() {
    let dir = tempfile::tempdir().unwrap();
    // A directory by a segment's name: every read fails, as on a bad sector.
    fs::create_dir(dir.path().join(format::segment_file_name(u64::MAX - 1))).unwrap();
    let (mut wal, recovery) = Wal::open(dir.path(), options(FOUR_ENTRIES, 1 << 20)).unwrap();
    let reasons: Vec<_> = recovery.corruptions.iter().map(|c| &c.reason).collect();
    assert!(matches!(reasons[..], [CorruptionReason::AckFileMissing, CorruptionReason::Unreadable { .. }]));
    assert_eq!(wal.next_seq(), u64::MAX);
    assert!(matches!(wal.append(b"x"), Err(WalError::SequenceExhausted)));
}

/// A small tmpfs mounted for one test, unmounted on drop. `None` where mounting is not
/// permitted (not root, or no mount capability).
struct TinyFilesystem {
    dir: tempfile::TempDir,
}

impl TinyFilesystem {
    fn mount(size: &str) -> Option<TinyFilesystem> {
        let dir = tempfile::tempdir().ok()?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then_some(TinyFilesystem { dir })
    }
}

impl Drop for TinyFilesystem {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.dir.path()).status();
    }
}

/// A real ENOSPC: a 256 KiB tmpfs fills, appending fails with `DiskFull` (never a panic or a
/// damaged file), acknowledging frees segments, and the buffered entries then reach the disk.
#[test]
fn disk_full_is_backpressure_and_the_log_resumes() {
    let Some(fs_guard) = TinyFilesystem::mount("256k") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let dir = fs_guard.dir.path().join("wal");
    let wal_options = options(32 * 1024, 64 * 1024 * 1024); // max_bytes far beyond the disk
    let (mut wal, _) = Wal::open(&dir, wal_options).unwrap();
    let mut appended = Vec::new();
    let error = loop {
        let seq = wal.next_seq();
        match wal.append(&payload(seq, 1000)).and_then(|seq| {
            appended.push(seq);
            if seq % 10 == 0 {
                wal.sync()
            } else {
                Ok(())
            }
        }) {
            Ok(()) => {}
            Err(e) => break e,
        }
        assert!(seq < 10_000, "the filesystem never filled");
    };
    assert!(matches!(error, WalError::DiskFull { .. }), "{error:?}");
    assert!(error.is_no_room());
    // Still full: retrying fails the same way and changes nothing.
    let next = wal.next_seq();
    assert!(matches!(wal.sync(), Err(WalError::DiskFull { .. })));
    assert_eq!(wal.next_seq(), next);

    // The sink delivered the first half: acknowledging frees whole segments.
    let half = appended[appended.len() / 2];
    wal.ack(half).unwrap();
    wal.sync().unwrap();
    let more = wal.append(&payload(wal.next_seq(), 1000)).unwrap();
    appended.push(more);
    wal.sync().unwrap();
    drop(wal);

    let (_, recovery) = Wal::open(&dir, wal_options).unwrap();
    assert_eq!(recovery.corruptions, []);
    let replayed = entries(recovery.replay);
    let expected: Vec<u64> = appended.iter().copied().filter(|&seq| seq > half).collect();
    assert_eq!(seqs(&replayed), expected);
    assert!(replayed.iter().all(|e| e.payload == payload(e.seq, 1000)));
}

// ---- model test ----

#[derive(Debug, Clone)]
enum Op {
    Append {
        len: usize,
    },
    Sync,
    /// Acknowledge a point chosen by this number among the unacknowledged entries.
    Ack(u16),
    /// Flush and read everything unacknowledged back from the live log.
    Read,
    /// Drop the log without sync. With `power_loss`, also cut every file back to what the last
    /// sync made durable; files created since are emptied (`zero_new_files`) or removed.
    Crash {
        power_loss: bool,
        zero_new_files: bool,
    },
    /// Sync, close, open.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..60usize).prop_map(|len| Op::Append { len }),
        2 => Just(Op::Sync),
        2 => any::<u16>().prop_map(Op::Ack),
        1 => Just(Op::Read),
        2 => (any::<bool>(), any::<bool>())
            .prop_map(|(power_loss, zero_new_files)| Op::Crash { power_loss, zero_new_files }),
        1 => Just(Op::Reopen),
    ]
}

/// What the log must hold: the unacknowledged entries, of which a prefix is durable.
struct Model {
    entries: VecDeque<Entry>,
    durable: usize,
    acked: u64,
    next_seq: u64,
}

const MODEL_OPTIONS: WalOptions = WalOptions { segment_bytes: 200, max_bytes: 600 };

/// Segment lengths as of the last sync (or open): what a power loss leaves.
fn durable_lengths(dir: &Path) -> HashMap<PathBuf, u64> {
    segment_files(dir).into_iter().map(|(_, path, len)| (path, len)).collect()
}

/// Opens the log (twice, to check that recovery is idempotent), checks the replay against the
/// model and brings the model in line with what survived.
fn reopen_and_check(dir: &Path, model: &mut Model) -> Result<Wal, TestCaseError> {
    let (wal, recovery) = Wal::open(dir, MODEL_OPTIONS).unwrap();
    prop_assert_eq!(recovery.acked, model.acked);
    let replayed = entries(recovery.replay);
    prop_assert_eq!(recovery.replay_entries, replayed.len() as u64);
    // In order, never duplicated, never altered: a prefix of the unacknowledged entries...
    prop_assert!(replayed.len() <= model.entries.len(), "replayed {:?}", seqs(&replayed));
    for (got, want) in replayed.iter().zip(&model.entries) {
        prop_assert_eq!(got, want);
    }
    // ...that holds at least every durable one.
    prop_assert!(replayed.len() >= model.durable, "lost synced entries: {:?}", seqs(&replayed));
    let next_seq = wal.next_seq();
    prop_assert!(next_seq > model.acked);
    prop_assert!(next_seq <= model.next_seq);
    prop_assert!(replayed.last().is_none_or(|last| next_seq > last.seq));
    prop_assert_eq!(wal.used_bytes(), disk_bytes(dir));
    drop(wal);

    let (wal, again) = Wal::open(dir, MODEL_OPTIONS).unwrap();
    prop_assert_eq!(entries(again.replay), replayed.clone());
    prop_assert_eq!(wal.next_seq(), next_seq);
    prop_assert!(again.corruptions.iter().all(|c| c.repair == Repair::Skipped));

    model.entries = replayed.into();
    model.durable = model.entries.len();
    model.next_seq = next_seq;
    Ok(wal)
}

fn run_model(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mut model = Model { entries: VecDeque::new(), durable: 0, acked: 0, next_seq: 1 };
    let (mut wal, _) = Wal::open(dir, MODEL_OPTIONS).unwrap();
    let mut durable = durable_lengths(dir);
    for op in ops {
        match op {
            Op::Append { len } => {
                let payload = payload(model.next_seq, len);
                match wal.append(&payload) {
                    Ok(seq) => {
                        prop_assert_eq!(seq, model.next_seq);
                        prop_assert!(wal.used_bytes() <= MODEL_OPTIONS.max_bytes);
                        model.entries.push_back(Entry { seq, payload });
                        model.next_seq += 1;
                    }
                    Err(WalError::Full { used, max }) => {
                        prop_assert!(used <= max && used + 16 + len as u64 + 24 > max, "{} {}", used, max);
                        prop_assert_eq!(wal.next_seq(), model.next_seq);
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("append: {e}"))),
                }
            }
            Op::Sync => {
                wal.sync().unwrap();
                model.durable = model.entries.len();
                durable = durable_lengths(dir);
                prop_assert_eq!(wal.used_bytes(), disk_bytes(dir));
            }
            Op::Ack(pick) => {
                let unacked = model.next_seq - 1 - model.acked;
                let up_to =
                    if unacked == 0 { model.acked } else { model.acked + 1 + u64::from(pick) % unacked };
                wal.ack(up_to).unwrap();
                let beyond = matches!(wal.ack(model.next_seq), Err(WalError::AckBeyondEnd { .. }));
                prop_assert!(beyond, "acknowledging past the end is refused");
                while model.entries.front().is_some_and(|e| e.seq <= up_to) {
                    model.entries.pop_front();
                    model.durable = model.durable.saturating_sub(1);
                }
                model.acked = up_to;
                prop_assert_eq!(wal.acked(), up_to);
                // No segment but the newest is left wholly acknowledged.
                let files = segment_files(dir);
                for pair in files.windows(2) {
                    prop_assert!(pair[1].0 > up_to + 1, "segment {} is wholly acknowledged", pair[0].0);
                }
            }
            Op::Read => {
                wal.flush().unwrap();
                let reader = wal.read_from(model.acked + 1);
                prop_assert_eq!(reader.end_seq(), model.next_seq);
                prop_assert_eq!(entries(reader), Vec::from(model.entries.clone()));
            }
            Op::Crash { power_loss, zero_new_files } => {
                drop(wal);
                if power_loss {
                    for (_, path, len) in segment_files(dir) {
                        match durable.get(&path) {
                            Some(&synced) => {
                                let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
                                file.set_len(len.min(synced)).unwrap();
                            }
                            None if zero_new_files => fs::write(&path, b"").unwrap(),
                            None => fs::remove_file(&path).unwrap(),
                        }
                    }
                }
                wal = reopen_and_check(dir, &mut model)?;
                durable = durable_lengths(dir);
            }
            Op::Reopen => {
                wal.sync().unwrap();
                model.durable = model.entries.len();
                drop(wal);
                let expected = model.entries.len();
                wal = reopen_and_check(dir, &mut model)?;
                prop_assert_eq!(model.entries.len(), expected, "a clean reopen replays every entry");
                durable = durable_lengths(dir);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random appends, syncs, acknowledgements, reads, crashes (with and without power loss)
    /// and reopens against an in-memory model.
    #[test]
    fn model(ops in proptest::collection::vec(op(), 1..120)) {
        run_model(ops)?;
    }
}

/// A reader positioned late in a large segment starts near its entry, not at the segment's
/// start: the written runs index the segment every 64 KiB or so (the disk buffer reads from
/// where the sink is, over and over, so a scan from the start would be quadratic).
#[test]
fn readers_start_near_their_entry_in_a_large_segment() {
    let dir = tempfile::tempdir().unwrap();
    let (mut wal, _) = Wal::open(dir.path(), options(64 << 20, 256 << 20)).unwrap();
    for seq in 1..=20_000 {
        assert_eq!(wal.append(&payload(seq, 100)).unwrap(), seq);
        if seq % 50 == 0 {
            wal.flush().unwrap();
        }
    }
    wal.sync().unwrap();
    let reader = wal.read_from(15_000);
    let (offset, first_seq) = reader.start().unwrap();
    assert!(first_seq <= 15_000 && 15_000 - first_seq < 1_000, "starts {} entries early", 15_000 - first_seq);
    assert!(offset > 1 << 20, "starts at byte {offset}, past the first MiB");
    let entries: Vec<_> = reader.map(Result::unwrap).collect();
    assert_eq!(entries.first().map(|e| e.seq), Some(15_000));
    assert_eq!(entries.len(), 5_001);
    // The same holds after the segment is closed and the log reopened (runs from the scan).
    drop(wal);
    let (wal, recovery) = Wal::open(dir.path(), options(64 << 20, 256 << 20)).unwrap();
    assert_eq!(recovery.replay_entries, 20_000);
    let reader = wal.read_from(19_990);
    let (_, first_seq) = reader.start().unwrap();
    assert!(19_990 - first_seq < 1_000, "after reopening, starts {} entries early", 19_990 - first_seq);
    let entries: Vec<_> = reader.map(Result::unwrap).collect();
    assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), (19_990..=20_000).collect::<Vec<_>>());
}
