//! Reading entries back in order, lazily, from a snapshot of the log's segments.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::path::PathBuf;

use super::error::{Corruption, CorruptionReason, Repair, WalError};
use super::scan::{FrameCursor, FrameRead, Run};

/// One entry read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The sequence number [`Wal::append`](super::Wal::append) returned for it.
    pub seq: u64,
    /// The bytes appended.
    pub payload: Vec<u8>,
}

/// The part of one segment a reader will read.
#[derive(Debug, Clone)]
pub(crate) struct SegmentPlan {
    pub path: PathBuf,
    pub runs: Vec<Run>,
}

/// An iterator over entries in sequence order, from a snapshot taken by
/// [`Wal::read_from`](super::Wal::read_from) (or at open, for [`Recovery::replay`](super::Recovery)).
///
/// It reads one entry at a time from disk and verifies each again. Ranges that recovery
/// already reported as damaged are not read. New damage (including a read error) yields one
/// `Err(WalError::Corrupt(..))` and reading goes on after it; failing to open or seek a
/// segment ends the iteration. A segment deleted meanwhile (fully acknowledged) is skipped.
#[derive(Debug)]
pub struct Reader {
    plans: VecDeque<SegmentPlan>,
    from_seq: u64,
    end_seq: u64,
    current: Option<OpenSegment>,
    failed: bool,
}

#[derive(Debug)]
struct OpenSegment {
    path: PathBuf,
    cursor: FrameCursor<File>,
    runs: VecDeque<Run>,
    /// The next sequence expected in the front run; `None` until positioned at its start.
    expected: Option<u64>,
}

impl Reader {
    /// A reader of the entries in `plans` from `from_seq` on; `end_seq` is one past the last.
    pub(crate) fn new(plans: Vec<SegmentPlan>, from_seq: u64, end_seq: u64) -> Self {
        let plans = plans
            .into_iter()
            .map(|mut plan| {
                plan.runs.retain(|run| run.end_seq > from_seq && run.end > run.start);
                plan
            })
            .filter(|plan| !plan.runs.is_empty())
            .collect();
        Reader { plans, from_seq, end_seq, current: None, failed: false }
    }

    /// One past the sequence number of the last entry in this snapshot.
    pub fn end_seq(&self) -> u64 {
        self.end_seq
    }

    /// Where reading starts: the first run's offset and first sequence number.
    #[cfg(test)]
    pub(crate) fn start(&self) -> Option<(u64, u64)> {
        let run = self.plans.front()?.runs.first()?;
        Some((run.start, run.first_seq))
    }

    fn fail(&mut self, error: WalError) -> Option<Result<Entry, WalError>> {
        self.failed = true;
        self.current = None;
        Some(Err(error))
    }
}

impl Iterator for Reader {
    type Item = Result<Entry, WalError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut payload = Vec::new();
        loop {
            if self.failed {
                return None;
            }
            let Some(segment) = self.current.as_mut() else {
                let plan = self.plans.pop_front()?;
                match File::open(&plan.path) {
                    Ok(file) => {
                        self.current = Some(OpenSegment {
                            path: plan.path,
                            cursor: FrameCursor::new(file),
                            runs: plan.runs.into(),
                            expected: None,
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return self.fail(WalError::io("open", &plan.path, e)),
                }
                continue;
            };
            let Some(run) = segment.runs.front().copied() else {
                self.current = None;
                continue;
            };
            let expected = match segment.expected {
                Some(expected) => expected,
                None => {
                    if let Err(e) = segment.cursor.seek(run.start) {
                        let error = WalError::io("seek", &segment.path, e);
                        return self.fail(error);
                    }
                    segment.expected = Some(run.first_seq);
                    run.first_seq
                }
            };
            let pos = segment.cursor.pos();
            if pos >= run.end {
                segment.runs.pop_front();
                segment.expected = None;
                continue;
            }
            match segment.cursor.read_frame(run.end, &mut payload) {
                Ok(FrameRead::Valid { seq, .. }) if seq == expected => {
                    segment.expected = Some(seq + 1);
                    if seq >= self.from_seq {
                        return Some(Ok(Entry { seq, payload }));
                    }
                }
                Ok(other) => {
                    let corruption = Corruption {
                        file: segment.path.clone(),
                        offset: pos,
                        skipped_bytes: run.end - pos,
                        lost_seqs: Some(expected.max(self.from_seq)..run.end_seq),
                        reason: other.reason(expected),
                        repair: Repair::Skipped,
                    };
                    segment.runs.pop_front();
                    segment.expected = None;
                    return Some(Err(WalError::Corrupt(corruption)));
                }
                Err(e) => {
                    // A bad sector: report it and go on with what can still be read.
                    let corruption = Corruption {
                        file: segment.path.clone(),
                        offset: pos,
                        skipped_bytes: run.end - pos,
                        lost_seqs: Some(expected.max(self.from_seq)..run.end_seq),
                        reason: CorruptionReason::Unreadable { error: e.to_string() },
                        repair: Repair::Skipped,
                    };
                    segment.runs.pop_front();
                    segment.expected = None;
                    return Some(Err(WalError::Corrupt(corruption)));
                }
            }
        }
    }
}
