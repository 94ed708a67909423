//! The acknowledged watermark on disk: two self-checking slots overwritten in turn, so that a
//! torn write loses at most the newest watermark (replaying a little more, never less) and an
//! acknowledgement needs no new disk block, even when the disk is full.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::error::WalError;
use super::format::{decode_ack_record, encode_ack_record, ACK_RECORD_LEN, ACK_SLOT_LEN};

/// Name of the ack file in the log directory.
pub(crate) const ACK_FILE_NAME: &str = "ack";
/// Name the ack file is built under before it is renamed into place (only at creation).
const ACK_TMP_NAME: &str = "ack.tmp";

/// What the ack file held when it was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AckState {
    /// A verified watermark.
    Valid(u64),
    /// There was no ack file; one was created holding 0.
    Created,
    /// Neither slot verifies.
    Corrupt,
}

/// The open ack file.
#[derive(Debug)]
pub(crate) struct AckFile {
    path: PathBuf,
    file: File,
    /// The slot the next store overwrites: never the one holding the newest valid watermark.
    next_slot: u64,
}

impl AckFile {
    /// Opens the ack file in `dir`, creating it (crash-safely: built under a temporary name,
    /// fsynced, renamed, directory fsynced) when missing.
    pub(crate) fn open(dir: &Path) -> Result<(AckFile, AckState), WalError> {
        let path = dir.join(ACK_FILE_NAME);
        let tmp = dir.join(ACK_TMP_NAME);
        match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(mut file) => {
                let mut bytes = Vec::new();
                (&mut file)
                    .take(2 * ACK_SLOT_LEN)
                    .read_to_end(&mut bytes)
                    .map_err(|e| WalError::io("read", &path, e))?;
                let slot = |index: u64| {
                    let start = (index * ACK_SLOT_LEN) as usize;
                    bytes.get(start..start + ACK_RECORD_LEN).and_then(decode_ack_record)
                };
                let (state, next_slot) = match (slot(0), slot(1)) {
                    (Some(a), Some(b)) if a >= b => (AckState::Valid(a), 1),
                    (Some(_), Some(b)) => (AckState::Valid(b), 0),
                    (Some(a), None) => (AckState::Valid(a), 1),
                    (None, Some(b)) => (AckState::Valid(b), 0),
                    (None, None) => (AckState::Corrupt, 0),
                };
                match fs::remove_file(&tmp) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(WalError::io("delete", &tmp, e)),
                }
                Ok((AckFile { path, file, next_slot }, state))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut bytes = vec![0u8; 2 * ACK_SLOT_LEN as usize];
                let record = encode_ack_record(0);
                bytes[..ACK_RECORD_LEN].copy_from_slice(&record);
                bytes[ACK_SLOT_LEN as usize..ACK_SLOT_LEN as usize + ACK_RECORD_LEN].copy_from_slice(&record);
                let mut file = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&tmp)
                    .map_err(|e| WalError::io("create", &tmp, e))?;
                file.write_all(&bytes).map_err(|e| WalError::io("write", &tmp, e))?;
                file.sync_all().map_err(|e| WalError::io("fsync", &tmp, e))?;
                drop(file);
                fs::rename(&tmp, &path).map_err(|e| WalError::io("rename into place", &path, e))?;
                sync_dir(dir)?;
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|e| WalError::io("open", &path, e))?;
                Ok((AckFile { path, file, next_slot: 0 }, AckState::Created))
            }
            Err(e) => Err(WalError::io("open", &path, e)),
        }
    }

    /// Persists `acked` (overwrite one slot in place, fdatasync). On error the other slot still
    /// holds the previous watermark, and the next store overwrites the same slot again.
    pub(crate) fn store(&mut self, acked: u64) -> Result<(), WalError> {
        let record = encode_ack_record(acked);
        self.file
            .seek(SeekFrom::Start(self.next_slot * ACK_SLOT_LEN))
            .and_then(|_| self.file.write_all(&record))
            .map_err(|e| WalError::io("write", &self.path, e))?;
        self.file.sync_data().map_err(|e| WalError::io("fsync", &self.path, e))?;
        self.next_slot ^= 1;
        Ok(())
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// Makes the directory's entries (created, renamed files) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| WalError::io("fsync directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_then_stored_watermarks_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ack, state) = AckFile::open(dir.path()).unwrap();
        assert_eq!(state, AckState::Created);
        for acked in [3, 9, 10] {
            ack.store(acked).unwrap();
            drop(ack);
            let (reopened, state) = AckFile::open(dir.path()).unwrap();
            assert_eq!(state, AckState::Valid(acked));
            ack = reopened;
        }
        assert_eq!(fs::metadata(ack.path()).unwrap().len(), 2 * ACK_SLOT_LEN);
    }

    #[test]
    fn a_torn_slot_falls_back_to_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ack, _) = AckFile::open(dir.path()).unwrap();
        ack.store(5).unwrap(); // slot 0
        ack.store(8).unwrap(); // slot 1
        drop(ack);
        let path = dir.path().join(ACK_FILE_NAME);
        let mut bytes = fs::read(&path).unwrap();
        bytes[ACK_SLOT_LEN as usize + 13] ^= 0x10; // damage the newest
        fs::write(&path, &bytes).unwrap();
        let (mut ack, state) = AckFile::open(dir.path()).unwrap();
        assert_eq!(state, AckState::Valid(5), "older watermark: replays more, loses nothing");
        // The next store overwrites the damaged slot, not the good one.
        ack.store(9).unwrap();
        let bytes = fs::read(&path).unwrap();
        assert_eq!(decode_ack_record(&bytes[..ACK_RECORD_LEN]), Some(5));
        assert_eq!(decode_ack_record(&bytes[ACK_SLOT_LEN as usize..]), Some(9));
    }

    #[test]
    fn both_slots_damaged_is_corrupt_and_a_leftover_temp_file_goes() {
        let dir = tempfile::tempdir().unwrap();
        drop(AckFile::open(dir.path()).unwrap());
        fs::write(dir.path().join(ACK_FILE_NAME), b"garbage").unwrap();
        fs::write(dir.path().join(ACK_TMP_NAME), b"half-built").unwrap();
        let (_, state) = AckFile::open(dir.path()).unwrap();
        assert_eq!(state, AckState::Corrupt);
        assert!(!dir.path().join(ACK_TMP_NAME).exists());
    }
}
