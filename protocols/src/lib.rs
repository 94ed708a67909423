//! Pure protocol code: bytes in, typed frames and records out. No I/O, no runtime, no clock.
pub mod framing;
#[doc(hidden)]
pub mod fuzzing;
pub mod mqtt;
pub mod payload;
pub mod record_json;
pub mod record_sql;
pub mod reply;
