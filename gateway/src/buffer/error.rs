//! What can go wrong in the write-ahead log, and what recovery found and repaired.

use std::fmt;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A failure of a write-ahead log operation. Every variant names the file involved where there
/// is one; [`WalError::Full`] and [`WalError::DiskFull`] are the two "no room" kinds a caller
/// turns into backpressure (the log stays consistent and appending resumes once room returns).
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// The log holds `max_bytes` already: nothing was appended and no sequence number was used.
    /// Room returns when [`Wal::ack`](super::Wal::ack) lets whole segments be deleted.
    #[error("disk buffer full: {used} of {max} bytes in use (acknowledge entries to free segments)")]
    Full { used: u64, max: u64 },
    /// The filesystem has no space left (ENOSPC, or a quota). Whatever was being written was
    /// rolled back; buffered entries stay buffered and the operation can be retried later.
    #[error("no space left on the device writing {}: {source}", path.display())]
    DiskFull { path: PathBuf, source: io::Error },
    /// An entry larger than fits in one segment.
    #[error("entry of {len} bytes is larger than the {max}-byte limit of one segment")]
    EntryTooLarge { len: u64, max: u64 },
    /// An acknowledgement of a sequence number that was never handed out.
    #[error("cannot acknowledge up to sequence {up_to}: the last appended sequence is {last}")]
    AckBeyondEnd { up_to: u64, last: u64 },
    /// Every sequence number has been handed out: the next entry would need `u64::MAX`, which
    /// is never used (one past the last entry must be representable). Only a damaged or forged
    /// directory gets here (a segment file or watermark near the end of the range); nothing
    /// was appended, and the log must be moved aside to go on.
    #[error("no sequence number left to append with (the log's directory names one near u64::MAX)")]
    SequenceExhausted,
    /// Options that cannot work (see [`WalOptions`](super::WalOptions)).
    #[error("invalid write-ahead log options: {0}")]
    InvalidOptions(String),
    /// A segment written by a newer format version: refusing to guess rather than skip its data.
    #[error("{}: segment format version {version} is not supported (this build reads version {supported})", path.display())]
    UnsupportedVersion { path: PathBuf, version: u16, supported: u16 },
    /// An fsync failed. After a failed fsync the kernel may have dropped the dirty pages, so
    /// nothing written since the last good fsync can be trusted: the log refuses further
    /// writes ([`WalError::Poisoned`]) and must be reopened, which re-validates the files.
    #[error("fsync of {} failed (the log must be reopened): {source}", path.display())]
    SyncFailed { path: PathBuf, source: io::Error },
    /// A previous fsync failed; see [`WalError::SyncFailed`].
    #[error("write-ahead log unusable after a failed fsync; reopen it")]
    Poisoned,
    /// Data that no longer verifies, found while reading (damage after the log was opened;
    /// what was damaged at open time is in [`Recovery::corruptions`](super::Recovery)).
    #[error("{0}")]
    Corrupt(Corruption),
    /// Any other I/O failure.
    #[error("{op} {}: {source}", path.display())]
    Io { op: &'static str, path: PathBuf, source: io::Error },
}

impl WalError {
    /// Classifies an I/O error: out-of-space conditions become [`WalError::DiskFull`].
    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        if is_out_of_space(&source) {
            WalError::DiskFull { path: path.to_path_buf(), source }
        } else {
            WalError::Io { op, path: path.to_path_buf(), source }
        }
    }

    /// True for the errors that mean "no room now, try again later": [`WalError::Full`] and
    /// [`WalError::DiskFull`].
    pub fn is_no_room(&self) -> bool {
        matches!(self, WalError::Full { .. } | WalError::DiskFull { .. })
    }
}

/// ENOSPC, and EDQUOT (a quota is as full as a disk to the log).
fn is_out_of_space(error: &io::Error) -> bool {
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    error.kind() == io::ErrorKind::StorageFull
        || (cfg!(target_os = "linux") && matches!(error.raw_os_error(), Some(ENOSPC | EDQUOT)))
}

/// One damaged region found by recovery (or by a reader): where, how many bytes were not
/// delivered, why, and what was done about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corruption {
    /// The segment (or ack) file.
    pub file: PathBuf,
    /// Byte offset in `file` where the damage starts.
    pub offset: u64,
    /// Bytes from `offset` that could not be delivered as entries.
    pub skipped_bytes: u64,
    /// Sequence numbers lost with them, when the log can tell (it cannot for a torn tail).
    pub lost_seqs: Option<Range<u64>>,
    /// Why the bytes were rejected.
    pub reason: CorruptionReason,
    /// What recovery did with them.
    pub repair: Repair,
}

/// Why bytes of a log file were rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorruptionReason {
    /// The file is shorter than a segment header (a crash right after the segment was created).
    TornHeader,
    /// The segment header does not verify (magic, checksum, or first sequence against the file
    /// name); the entries after it are still read, each verifying itself.
    BadHeader,
    /// Fewer bytes left than a frame header, or a frame length beyond the end of the file: an
    /// entry whose write did not complete, or garbage.
    PartialEntry { needed: u64, available: u64 },
    /// The frame's CRC32C does not match its length, sequence and payload.
    ChecksumMismatch,
    /// A frame that verifies but carries the wrong sequence number (stale or misplaced data).
    SequenceMismatch { expected: u64, found: u64 },
    /// A frame that verifies but whose sequence number belongs to the next segment.
    BeyondNextSegment { seq: u64, next_segment: u64 },
    /// Reading the file failed (an I/O error such as a bad sector): the rest of the segment is
    /// skipped, never truncated, and reported again by the next open.
    Unreadable { error: String },
    /// The ack file holds no valid watermark; recovery replays from the first segment.
    AckFileCorrupt,
    /// The ack file is missing although segments exist; recovery replays from the first segment.
    AckFileMissing,
}

/// What recovery did with a damaged region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Skipped over; the bytes stay on disk (the segment is deleted once acknowledged) and are
    /// reported again by the next open.
    Skipped,
    /// The segment was truncated at `offset` (a torn tail of the newest segment).
    Truncated,
    /// The whole file was deleted (it held no entry that needed replaying).
    Deleted,
    /// The ack file was rewritten with the watermark recovery settled on.
    Rewritten,
}

impl fmt::Display for CorruptionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CorruptionReason::TornHeader => f.write_str("segment shorter than its header"),
            CorruptionReason::BadHeader => f.write_str("segment header does not verify"),
            CorruptionReason::PartialEntry { needed, available } => {
                write!(f, "partial entry: needs {needed} bytes, {available} left")
            }
            CorruptionReason::ChecksumMismatch => f.write_str("entry checksum mismatch"),
            CorruptionReason::SequenceMismatch { expected, found } => {
                write!(f, "entry carries sequence {found}, expected {expected}")
            }
            CorruptionReason::BeyondNextSegment { seq, next_segment } => {
                write!(f, "entry sequence {seq} belongs to the next segment (which starts at {next_segment})")
            }
            CorruptionReason::Unreadable { error } => write!(f, "unreadable: {error}"),
            CorruptionReason::AckFileCorrupt => f.write_str("ack file holds no valid watermark"),
            CorruptionReason::AckFileMissing => f.write_str("ack file missing"),
        }
    }
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at byte {}: {}; {} bytes skipped",
            self.file.display(),
            self.offset,
            self.reason,
            self.skipped_bytes
        )?;
        if let Some(lost) = &self.lost_seqs {
            write!(f, ", sequences {}..{} lost", lost.start, lost.end)?;
        }
        let repair = match self.repair {
            Repair::Skipped => "skipped",
            Repair::Truncated => "truncated",
            Repair::Deleted => "file deleted",
            Repair::Rewritten => "rewritten",
        };
        write!(f, " ({repair})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_space_is_its_own_kind() {
        let path = Path::new("/x/1.wal");
        let full = WalError::io("write", path, io::Error::from_raw_os_error(28));
        assert!(matches!(full, WalError::DiskFull { .. }), "{full:?}");
        assert!(full.is_no_room());
        let kind = WalError::io("write", path, io::Error::from(io::ErrorKind::StorageFull));
        assert!(matches!(kind, WalError::DiskFull { .. }));
        let other = WalError::io("write", path, io::Error::from_raw_os_error(5));
        assert!(matches!(other, WalError::Io { op: "write", .. }), "{other:?}");
        assert!(!other.is_no_room());
    }

    #[test]
    fn corruption_message_names_file_offset_and_reason() {
        let c = Corruption {
            file: PathBuf::from("/buf/00000000000000000001.wal"),
            offset: 40,
            skipped_bytes: 18,
            lost_seqs: Some(3..4),
            reason: CorruptionReason::ChecksumMismatch,
            repair: Repair::Skipped,
        };
        assert_eq!(
            c.to_string(),
            "/buf/00000000000000000001.wal at byte 40: entry checksum mismatch; 18 bytes skipped, \
             sequences 3..4 lost (skipped)"
        );
    }
}
