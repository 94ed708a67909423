//! The bodies of the cargo-fuzz targets in `protocols/fuzz`: bytes in, every property checked
//! (a failed check panics). Shared with `tests/fuzz_corpus.rs`, which replays the committed
//! corpora on the stable toolchain. Not part of the API.
//!
//! Every target reads a few configuration bytes (limits, split points) from the front of its
//! input and the bytes under test after them; reads past the end give zeros. A plain byte
//! layout, rather than `arbitrary`, keeps the corpus stable and lets [`seeds`] write real
//! packets and payloads into it with weir's own encoders.

mod framing;
mod ingest;
mod mqtt;
mod payload;
pub mod seeds;
mod session;

pub use framing::tcp_framing;
pub use ingest::ws_ingest;
pub use mqtt::{mqtt_decode_v311, mqtt_decode_v5};
pub use payload::{payload_json, payload_protobuf};
pub use session::mqtt_session;

/// The checks of one fuzz target: bytes in, a panic on any violation.
pub type Check = fn(&[u8]);

/// Every fuzz target by name, as `protocols/fuzz` builds them and its corpus directories are
/// named.
pub const TARGETS: &[(&str, Check)] = &[
    ("mqtt_decode_v311", mqtt_decode_v311),
    ("mqtt_decode_v5", mqtt_decode_v5),
    ("mqtt_session", mqtt_session),
    ("tcp_framing", tcp_framing),
    ("ws_ingest", ws_ingest),
    ("payload_json", payload_json),
    ("payload_protobuf", payload_protobuf),
];

/// Reads a fuzz input from the front; past its end every read gives zeros or nothing.
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&first, rest)) => {
                self.data = rest;
                first
            }
            None => 0,
        }
    }

    /// Big-endian.
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    /// Up to `len` bytes.
    fn bytes(&mut self, len: usize) -> &'a [u8] {
        let (taken, rest) = self.data.split_at(len.min(self.data.len()));
        self.data = rest;
        taken
    }

    fn rest(self) -> &'a [u8] {
        self.data
    }
}
