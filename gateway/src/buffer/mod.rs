//! The disk buffer's write-ahead log: a segmented, checksummed, append-only log of opaque
//! entries in one directory, with crash recovery and an acknowledged watermark.
//!
//! Not wired into the data path here: the caller runs [`Wal`] on a blocking thread, appends
//! encoded records, calls [`Wal::sync`] per batch or on a timer, replays
//! [`Recovery::replay`] after a restart and acknowledges what the sink committed with
//! [`Wal::ack`]. [`WalError::Full`] and [`WalError::DiskFull`] are backpressure, not failures.
//! The byte layout is described in `format.rs`; an entry holds one fabric item as a protobuf
//! `weir.v1.BufferedItem` ([`encode_item`], [`decode_item`]).

mod ack;
mod error;
mod format;
/// Recovery under a fuzzer: see `gateway/fuzz`.
#[doc(hidden)]
pub mod fuzzing;
mod item;
mod reader;
mod scan;
mod wal;

#[cfg(test)]
mod tests;

pub use error::{Corruption, CorruptionReason, Repair, WalError};
pub use item::{decode_item, encode_item, ItemError};
pub use reader::{Entry, Reader};
pub use wal::{Recovery, Wal, WalOptions};
