//! The disk buffer's write-ahead log: a segmented, checksummed, append-only log of opaque
//! entries in one directory, with crash recovery and an acknowledged watermark.
//!
//! [`Wal`] is the log itself (synchronous: run it on a blocking thread). [`DiskBuffer`]
//! (`stage.rs`) puts it in the data path between the batchers and the sink driver: it appends
//! batches, fsyncs per batch or on a timer, settles `ack = "buffered"` acks after the fsync,
//! feeds the sink in log order (from memory, or read back from disk when the sink is behind or
//! after a restart) and acknowledges what the sink committed. [`WalError::Full`] and
//! [`WalError::DiskFull`] are backpressure, not failures. The byte layout is described in
//! `format.rs`; an entry holds one fabric item as a protobuf `weir.v1.BufferedItem`
//! ([`encode_item`], [`decode_item`]).

mod ack;
mod error;
mod format;
/// Recovery under a fuzzer: see `gateway/fuzz`.
#[doc(hidden)]
pub mod fuzzing;
mod item;
mod reader;
mod scan;
mod stage;
mod wal;

#[cfg(test)]
mod tests;

pub use error::{Corruption, CorruptionReason, Repair, WalError};
pub use item::{decode_item, encode_item, ItemError};
pub use reader::{Entry, Reader};
pub use stage::{CommitLog, DiskBuffer};
pub use wal::{Recovery, Wal, WalOptions};
