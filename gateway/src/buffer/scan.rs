//! Reading frames back from a segment: the frame cursor, and the recovery scan that validates a
//! whole segment and maps which byte ranges hold good entries. Generic over `Read + Seek` so it
//! runs as well over a byte slice (tests, fuzzing) as over a file.

use std::io::{self, BufReader, Read, Seek};
use std::path::Path;

use super::error::{Corruption, CorruptionReason, Repair, WalError};
use super::format::{self, FrameHeader, HeaderCheck, FRAME_HEADER_LEN, SEGMENT_HEADER_LEN};

/// Read-ahead of the frame cursor.
const READ_BUFFER_BYTES: usize = 128 * 1024;

/// Runs are split at about this size, so that they also index a segment: a reader positioned
/// on a sequence number skips at most this much to reach it.
pub(crate) const RUN_SPLIT_BYTES: u64 = 64 * 1024;

/// A byte range of a segment holding consecutive valid frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    /// Offset of the first frame.
    pub start: u64,
    /// Offset just past the last frame.
    pub end: u64,
    /// Sequence number of the first frame.
    pub first_seq: u64,
    /// Sequence number just past the last frame.
    pub end_seq: u64,
}

/// What reading one frame at the cursor found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameRead {
    /// A frame whose checksum verifies; its payload is in the buffer and the cursor is past it.
    Valid { seq: u64, frame_len: u64 },
    /// The cursor is at the end.
    End,
    /// Too few bytes left for the frame header, or the length runs past the end.
    Partial { needed: u64, available: u64 },
    /// A length that fits but a checksum that does not match.
    BadChecksum { frame_len: u64 },
}

impl FrameRead {
    /// The corruption reason for anything but a valid frame with the expected sequence.
    pub(crate) fn reason(self, expected: u64) -> CorruptionReason {
        match self {
            FrameRead::Valid { seq, .. } => CorruptionReason::SequenceMismatch { expected, found: seq },
            FrameRead::End => CorruptionReason::PartialEntry { needed: FRAME_HEADER_LEN, available: 0 },
            FrameRead::Partial { needed, available } => CorruptionReason::PartialEntry { needed, available },
            FrameRead::BadChecksum { .. } => CorruptionReason::ChecksumMismatch,
        }
    }
}

/// Reads frames at a tracked position. No allocation is larger than the bytes that are really
/// there: a frame length is checked against the end before its payload is read.
#[derive(Debug)]
pub(crate) struct FrameCursor<R> {
    reader: BufReader<R>,
    pos: u64,
}

impl<R: Read + Seek> FrameCursor<R> {
    /// A cursor over `inner`, which must be positioned at offset 0.
    pub(crate) fn new(inner: R) -> Self {
        FrameCursor { reader: BufReader::with_capacity(READ_BUFFER_BYTES, inner), pos: 0 }
    }

    pub(crate) fn pos(&self) -> u64 {
        self.pos
    }

    /// Moves to `pos`, keeping the read-ahead when the move stays inside it.
    pub(crate) fn seek(&mut self, pos: u64) -> io::Result<()> {
        if pos != self.pos {
            let delta = i64::try_from(i128::from(pos) - i128::from(self.pos))
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "seek offset out of range"))?;
            self.reader.seek_relative(delta)?;
            self.pos = pos;
        }
        Ok(())
    }

    /// Reads the bytes of a segment header at the cursor.
    fn read_header(&mut self) -> io::Result<[u8; SEGMENT_HEADER_LEN as usize]> {
        let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
        self.reader.read_exact(&mut header)?;
        self.pos += SEGMENT_HEADER_LEN;
        Ok(header)
    }

    /// Reads the frame at the cursor, not looking past `end`. The payload lands in `payload`.
    /// Only a valid frame is guaranteed to leave the cursor just past it.
    pub(crate) fn read_frame(&mut self, end: u64, payload: &mut Vec<u8>) -> io::Result<FrameRead> {
        if self.pos >= end {
            return Ok(FrameRead::End);
        }
        let available = end - self.pos;
        if available < FRAME_HEADER_LEN {
            return Ok(FrameRead::Partial { needed: FRAME_HEADER_LEN, available });
        }
        let mut header = [0u8; FRAME_HEADER_LEN as usize];
        self.reader.read_exact(&mut header)?;
        self.pos += FRAME_HEADER_LEN;
        let header = FrameHeader::decode(&header);
        let frame_len = format::frame_len(u64::from(header.len));
        if frame_len > available {
            return Ok(FrameRead::Partial { needed: frame_len, available });
        }
        payload.clear();
        payload.resize(header.len as usize, 0);
        self.reader.read_exact(payload)?;
        self.pos += u64::from(header.len);
        if header.verifies(payload) {
            Ok(FrameRead::Valid { seq: header.seq, frame_len })
        } else {
            Ok(FrameRead::BadChecksum { frame_len })
        }
    }
}

/// What the recovery scan found in one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SegmentScan {
    /// The byte ranges of good frames, in order.
    pub runs: Vec<Run>,
    /// Damage, in file order (all `Repair::Skipped`; the caller decides about repairs).
    pub corruptions: Vec<Corruption>,
    /// Where the unframable rest of the file begins, when framing was lost before the end.
    pub tail_lost_at: Option<u64>,
    /// A read failed: the rest of the segment could not be checked (and must not be cut).
    pub unreadable: bool,
    /// The last good entry's sequence number.
    pub last_seq: Option<u64>,
    /// Good entries after the acknowledged watermark, and their payload bytes.
    pub replay_entries: u64,
    pub replay_bytes: u64,
}

/// Validates every frame of a segment of `file_len` bytes named for `first_seq`. `seq_limit` is
/// the next segment's first sequence, if there is one: an entry at or past it is not this
/// segment's. `acked` only feeds the replay counts.
///
/// A frame with a bad checksum costs only itself when the frame after it verifies with the next
/// sequence number (its length was right, its payload damaged); otherwise the framing is lost
/// and the rest of the segment is skipped. A read error (a bad sector) is damage too: the rest
/// of the segment is reported unreadable and skipped, so one bad block cannot stop every open.
pub(crate) fn scan_segment<R: Read + Seek>(
    inner: R,
    path: &Path,
    file_len: u64,
    first_seq: u64,
    seq_limit: Option<u64>,
    acked: u64,
) -> Result<SegmentScan, WalError> {
    let mut scan = SegmentScan {
        runs: Vec::new(),
        corruptions: Vec::new(),
        tail_lost_at: None,
        unreadable: false,
        last_seq: None,
        replay_entries: 0,
        replay_bytes: 0,
    };
    let corruption = |offset, skipped_bytes, lost_seqs, reason| Corruption {
        file: path.to_path_buf(),
        offset,
        skipped_bytes,
        lost_seqs,
        reason,
        repair: Repair::Skipped,
    };
    // u64::MAX is never an entry's sequence number (one past the last entry must be
    // representable): found by fuzzing, a segment named for it overflowed `expected + 1`.
    let in_segment = |seq: u64| seq < seq_limit.unwrap_or(u64::MAX);
    let lost_to_limit = |from: u64| seq_limit.filter(|&limit| limit > from).map(|limit| from..limit);
    if file_len < SEGMENT_HEADER_LEN {
        scan.corruptions.push(corruption(0, file_len, None, CorruptionReason::TornHeader));
        scan.tail_lost_at = Some(0);
        return Ok(scan);
    }
    let mut cursor = FrameCursor::new(inner);
    let header = match cursor.read_header() {
        Ok(header) => header,
        Err(error) => {
            let reason = CorruptionReason::Unreadable { error: error.to_string() };
            scan.corruptions.push(corruption(0, file_len, lost_to_limit(first_seq), reason));
            scan.unreadable = true;
            return Ok(scan);
        }
    };
    match format::check_segment_header(&header, first_seq) {
        HeaderCheck::Valid => {}
        HeaderCheck::Invalid => {
            scan.corruptions.push(corruption(0, SEGMENT_HEADER_LEN, None, CorruptionReason::BadHeader));
        }
        HeaderCheck::UnsupportedVersion(version) => {
            return Err(WalError::UnsupportedVersion {
                path: path.to_path_buf(),
                version,
                supported: format::FORMAT_VERSION,
            });
        }
    }
    let mut payload = Vec::new();
    let mut expected = first_seq;
    let mut run: Option<Run> = None;
    let mut frame_start = SEGMENT_HEADER_LEN;
    let frames: io::Result<()> = (|| {
        loop {
            frame_start = cursor.pos();
            let pos = frame_start;
            let lost_reason = match cursor.read_frame(file_len, &mut payload)? {
                FrameRead::End => break,
                FrameRead::Valid { seq, frame_len } if seq == expected && in_segment(seq) => {
                    if run.is_some_and(|r| r.end - r.start >= RUN_SPLIT_BYTES) {
                        scan.runs.extend(run.take());
                    }
                    let run = run.get_or_insert(Run { start: pos, end: pos, first_seq: seq, end_seq: seq });
                    run.end = pos + frame_len;
                    run.end_seq = seq + 1;
                    scan.last_seq = Some(seq);
                    if seq > acked {
                        scan.replay_entries += 1;
                        scan.replay_bytes += frame_len - FRAME_HEADER_LEN;
                    }
                    expected += 1;
                    continue;
                }
                FrameRead::Valid { seq, .. } if seq == expected => {
                    CorruptionReason::BeyondNextSegment { seq, next_segment: seq_limit.unwrap_or(seq) }
                }
                FrameRead::BadChecksum { frame_len } => {
                    let next = pos + frame_len;
                    let resynced = next < file_len && expected.checked_add(1).is_some_and(in_segment) && {
                        cursor.seek(next)?;
                        let probe = cursor.read_frame(file_len, &mut payload)?;
                        matches!(probe, FrameRead::Valid { seq, .. } if seq == expected + 1)
                    };
                    if resynced {
                        scan.corruptions.push(corruption(
                            pos,
                            frame_len,
                            Some(expected..expected + 1),
                            CorruptionReason::ChecksumMismatch,
                        ));
                        scan.runs.extend(run.take());
                        expected += 1;
                        cursor.seek(next)?;
                        continue;
                    }
                    CorruptionReason::ChecksumMismatch
                }
                other => other.reason(expected),
            };
            scan.corruptions.push(corruption(pos, file_len - pos, lost_to_limit(expected), lost_reason));
            scan.tail_lost_at = Some(pos);
            break;
        }
        Ok(())
    })();
    if let Err(error) = frames {
        let reason = CorruptionReason::Unreadable { error: error.to_string() };
        scan.corruptions.push(corruption(
            frame_start,
            file_len - frame_start,
            lost_to_limit(expected),
            reason,
        ));
        scan.unreadable = true;
    }
    scan.runs.extend(run);
    Ok(scan)
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use proptest::prelude::*;

    use super::*;
    use crate::buffer::format::{encode_frame, encode_segment_header};

    /// A segment named for `first` holding `payloads`, and the offset of each frame.
    fn segment(first: u64, payloads: &[&[u8]]) -> (Vec<u8>, Vec<u64>) {
        let mut bytes = encode_segment_header(first).to_vec();
        let mut offsets = Vec::new();
        for (i, payload) in payloads.iter().enumerate() {
            offsets.push(bytes.len() as u64);
            encode_frame(first + i as u64, payload, &mut bytes);
        }
        (bytes, offsets)
    }

    fn scan(bytes: &[u8], first: u64, limit: Option<u64>) -> SegmentScan {
        scan_segment(Cursor::new(bytes), Path::new("s.wal"), bytes.len() as u64, first, limit, 0).unwrap()
    }

    #[test]
    fn clean_segment_is_one_run() {
        let (bytes, _) = segment(5, &[b"a", b"bb", b""]);
        let scan = scan(&bytes, 5, Some(8));
        assert_eq!(scan.corruptions, []);
        assert_eq!(scan.runs, [Run { start: 24, end: bytes.len() as u64, first_seq: 5, end_seq: 8 }]);
        assert_eq!((scan.last_seq, scan.replay_entries, scan.replay_bytes), (Some(7), 3, 3));
        assert_eq!(scan.tail_lost_at, None);
    }

    #[test]
    fn replay_counts_start_after_the_watermark() {
        let (bytes, _) = segment(1, &[b"a", b"bb", b"ccc"]);
        let scan =
            scan_segment(Cursor::new(&bytes), Path::new("s.wal"), bytes.len() as u64, 1, None, 2).unwrap();
        assert_eq!((scan.replay_entries, scan.replay_bytes), (1, 3));
    }

    /// Fuzzing found this (input `regression-sequence-overflow-in-scan`): in a segment named for
    /// u64::MAX, a frame with a bad checksum overflowed `expected + 1`, and a valid one would
    /// have overflowed the run's end. u64::MAX is not an entry's sequence number.
    #[test]
    fn sequence_overflow_in_scan() {
        let (mut bytes, offsets) = segment(u64::MAX, &[b"x"]);
        let valid = scan(&bytes, u64::MAX, None);
        assert_eq!((valid.last_seq, valid.runs.len()), (None, 0));
        assert_eq!(valid.tail_lost_at, Some(offsets[0]));
        let reason = &valid.corruptions[0].reason;
        assert_eq!(*reason, CorruptionReason::BeyondNextSegment { seq: u64::MAX, next_segment: u64::MAX });

        bytes[offsets[0] as usize + 16] ^= 1; // damage the payload
        bytes.extend_from_slice(&[0xa9; 20]);
        let damaged = scan(&bytes, u64::MAX, None);
        assert_eq!(damaged.corruptions[0].reason, CorruptionReason::ChecksumMismatch);
        assert_eq!((damaged.last_seq, damaged.tail_lost_at), (None, Some(offsets[0])));
    }

    #[test]
    fn header_only_and_torn_header() {
        let (bytes, _) = segment(1, &[]);
        let clean = scan(&bytes, 1, None);
        assert_eq!((clean.runs.len(), clean.corruptions.len(), clean.last_seq), (0, 0, None));
        let torn = scan(&bytes[..10], 1, None);
        assert_eq!(torn.corruptions[0].reason, CorruptionReason::TornHeader);
        assert_eq!(torn.corruptions[0].skipped_bytes, 10);
        assert_eq!(torn.tail_lost_at, Some(0));
    }

    #[test]
    fn damaged_header_still_yields_the_entries() {
        let (mut bytes, _) = segment(3, &[b"x", b"y"]);
        bytes[0] ^= 0xff;
        let scan = scan(&bytes, 3, None);
        assert_eq!(scan.corruptions.len(), 1);
        assert_eq!(scan.corruptions[0].reason, CorruptionReason::BadHeader);
        assert_eq!(scan.last_seq, Some(4));
    }

    #[test]
    fn payload_damage_costs_one_entry() {
        let (mut bytes, offsets) = segment(1, &[b"aaaa", b"bbbb", b"cccc"]);
        bytes[offsets[1] as usize + 17] ^= 0x01;
        let scan = scan(&bytes, 1, None);
        assert_eq!(scan.corruptions.len(), 1, "{:?}", scan.corruptions);
        let c = &scan.corruptions[0];
        assert_eq!((c.offset, c.skipped_bytes, c.lost_seqs.clone()), (offsets[1], 20, Some(2..3)));
        assert_eq!(c.reason, CorruptionReason::ChecksumMismatch);
        assert_eq!(
            scan.runs,
            [
                Run { start: 24, end: offsets[1], first_seq: 1, end_seq: 2 },
                Run { start: offsets[2], end: bytes.len() as u64, first_seq: 3, end_seq: 4 },
            ]
        );
        assert_eq!(scan.tail_lost_at, None);
    }

    #[test]
    fn length_damage_loses_the_framing() {
        let (mut bytes, offsets) = segment(1, &[b"aaaa", b"bbbb", b"cccc"]);
        bytes[offsets[1] as usize] ^= 0x02;
        let scan = scan(&bytes, 1, Some(4));
        let c = &scan.corruptions[0];
        assert_eq!(c.offset, offsets[1]);
        assert_eq!(c.skipped_bytes, bytes.len() as u64 - offsets[1]);
        assert_eq!(c.lost_seqs, Some(2..4), "bounded by the next segment");
        assert_eq!(scan.tail_lost_at, Some(offsets[1]));
        assert_eq!(scan.last_seq, Some(1));
    }

    #[test]
    fn a_bad_last_frame_is_a_lost_tail() {
        let (mut bytes, offsets) = segment(1, &[b"aaaa", b"bbbb"]);
        *bytes.last_mut().unwrap() ^= 0x80;
        let scan = scan(&bytes, 1, None);
        assert_eq!(scan.tail_lost_at, Some(offsets[1]));
        assert_eq!(scan.corruptions[0].lost_seqs, None, "a tail without a next segment");
    }

    #[test]
    fn zero_filled_tail() {
        let (mut bytes, offsets) = segment(1, &[b"aaaa"]);
        let end = bytes.len() as u64;
        bytes.extend_from_slice(&[0u8; 4096]);
        let scan = scan(&bytes, 1, None);
        assert_eq!(scan.last_seq, Some(1));
        assert_eq!(scan.tail_lost_at, Some(end));
        assert_eq!(scan.corruptions[0].reason, CorruptionReason::ChecksumMismatch);
        assert_eq!(offsets.len(), 1);
    }

    #[test]
    fn wrong_sequence_is_rejected() {
        let mut bytes = encode_segment_header(1).to_vec();
        encode_frame(1, b"a", &mut bytes);
        encode_frame(3, b"b", &mut bytes);
        let scan = scan(&bytes, 1, None);
        assert_eq!(scan.corruptions[0].reason, CorruptionReason::SequenceMismatch { expected: 2, found: 3 });
        assert_eq!(scan.last_seq, Some(1));
    }

    #[test]
    fn entries_past_the_next_segment_are_rejected() {
        let (bytes, offsets) = segment(1, &[b"a", b"b", b"c"]);
        let scan = scan(&bytes, 1, Some(3));
        assert_eq!(scan.last_seq, Some(2));
        assert_eq!(scan.corruptions[0].offset, offsets[2]);
        assert_eq!(
            scan.corruptions[0].reason,
            CorruptionReason::BeyondNextSegment { seq: 3, next_segment: 3 }
        );
    }

    #[test]
    fn huge_length_does_not_allocate() {
        let mut bytes = encode_segment_header(1).to_vec();
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(&[0u8; 12]);
        let scan = scan(&bytes, 1, None);
        assert_eq!(
            scan.corruptions[0].reason,
            CorruptionReason::PartialEntry { needed: 16 + u64::from(u32::MAX), available: 16 }
        );
    }

    #[test]
    fn unsupported_version_is_an_error() {
        let mut bytes = encode_segment_header(1).to_vec();
        bytes[8] = 9;
        let crc = crc32c::crc32c(&bytes[0..20]);
        bytes[20..24].copy_from_slice(&crc.to_le_bytes());
        let result = scan_segment(Cursor::new(&bytes), Path::new("s.wal"), 24, 1, None, 0);
        assert!(matches!(result, Err(WalError::UnsupportedVersion { version: 9, .. })), "{result:?}");
    }

    /// The entries the runs of `scan` point at, read back over `bytes`.
    fn entries_in_runs(bytes: &[u8], scan: &SegmentScan) -> Vec<(u64, Vec<u8>)> {
        let mut cursor = FrameCursor::new(Cursor::new(bytes));
        let mut payload = Vec::new();
        let mut entries = Vec::new();
        for run in &scan.runs {
            cursor.seek(run.start).unwrap();
            let mut expected = run.first_seq;
            while cursor.pos() < run.end {
                match cursor.read_frame(run.end, &mut payload).unwrap() {
                    FrameRead::Valid { seq, .. } if seq == expected => entries.push((seq, payload.clone())),
                    other => panic!("run {run:?} holds {other:?}"),
                }
                expected += 1;
            }
            assert_eq!(expected, run.end_seq);
        }
        entries
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Whatever happens to a segment's bytes (bits flipped, cut short), the scan never
        /// fails or panics, delivers only entries that were written (same sequence, same
        /// payload, in order), and delivers every entry that lies wholly before the damage
        /// (damage to the header alone costs no entry).
        #[test]
        fn damaged_segments_yield_only_written_entries(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..12),
            flips in proptest::collection::vec((any::<proptest::sample::Index>(), 1..=255u8), 0..4),
            cut in proptest::option::of(any::<proptest::sample::Index>()),
        ) {
            let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            let (mut bytes, offsets) = segment(7, &refs);
            let mut first_frame_damage = bytes.len();
            for (at, mask) in &flips {
                let at = at.index(bytes.len());
                bytes[at] ^= mask;
                if at >= 24 {
                    first_frame_damage = first_frame_damage.min(at);
                }
            }
            if let Some(cut) = cut {
                let cut = cut.index(bytes.len() + 1);
                bytes.truncate(cut);
                first_frame_damage = first_frame_damage.min(cut);
            }
            let scan = scan_segment(Cursor::new(&bytes), Path::new("s.wal"), bytes.len() as u64, 7, None, 0)
                .expect("a damaged segment is reported, not an error");
            let entries = entries_in_runs(&bytes, &scan);
            for window in entries.windows(2) {
                prop_assert!(window[0].0 < window[1].0);
            }
            for (seq, payload) in &entries {
                prop_assert_eq!(payload, &payloads[(seq - 7) as usize]);
            }
            let intact = offsets
                .iter()
                .zip(&payloads)
                .take_while(|(&offset, payload)| offset as usize + 16 + payload.len() <= first_frame_damage)
                .count();
            let delivered: Vec<u64> = entries.iter().take(intact).map(|e| e.0).collect();
            prop_assert_eq!(delivered, (7..7 + intact as u64).collect::<Vec<_>>());
            if flips.is_empty() && cut.is_none() {
                prop_assert_eq!(entries.len(), payloads.len());
                prop_assert!(scan.corruptions.is_empty());
            }
        }

        /// Arbitrary bytes: reported, never a panic, an error or an oversized allocation.
        #[test]
        fn arbitrary_bytes_never_fail_the_scan(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let scan = scan_segment(Cursor::new(&bytes), Path::new("s.wal"), bytes.len() as u64, 1, None, 0);
            prop_assert!(scan.is_ok());
        }
    }

    /// Reads like a cursor over `bytes` but fails every read that touches `fail_at`.
    struct BadSector {
        inner: Cursor<Vec<u8>>,
        fail_at: u64,
    }

    impl Read for BadSector {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let pos = self.inner.position();
            if pos <= self.fail_at && self.fail_at < pos + buf.len() as u64 {
                return Err(io::Error::other("bad sector"));
            }
            self.inner.read(buf)
        }
    }

    impl Seek for BadSector {
        fn seek(&mut self, to: io::SeekFrom) -> io::Result<u64> {
            self.inner.seek(to)
        }
    }

    #[test]
    fn a_read_error_is_reported_and_the_rest_skipped() {
        let big = vec![7u8; 60 * 1024];
        let (bytes, offsets) = segment(1, &[&big, &big, &big]);
        let len = bytes.len() as u64;
        // Past the first read-ahead (128 KiB), inside the third entry.
        let reader = BadSector { inner: Cursor::new(bytes.clone()), fail_at: 150_000 };
        let scan = scan_segment(reader, Path::new("s.wal"), len, 1, Some(4), 0).unwrap();
        assert!(scan.unreadable);
        assert_eq!(scan.tail_lost_at, None, "not a torn tail: never truncated");
        assert_eq!(scan.last_seq, Some(2));
        assert_eq!(scan.corruptions.len(), 1);
        let c = &scan.corruptions[0];
        assert!(
            matches!(&c.reason, CorruptionReason::Unreadable { error } if error == "bad sector"),
            "{c:?}"
        );
        assert_eq!(
            (c.offset, c.skipped_bytes, c.lost_seqs.clone()),
            (offsets[2], len - offsets[2], Some(3..4))
        );

        // In the first read-ahead: the header cannot be read either.
        let reader = BadSector { inner: Cursor::new(bytes), fail_at: 30 };
        let scan = scan_segment(reader, Path::new("s.wal"), len, 1, None, 0).unwrap();
        assert!(scan.unreadable);
        assert_eq!(scan.last_seq, None);
        assert_eq!((scan.corruptions[0].offset, scan.corruptions[0].skipped_bytes), (0, len));
    }
}
