//! weir's protobuf types, generated at build time from `schemas/weir.proto`.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/weir.v1.rs"));
}

pub use v1::{
    metric_value, Ack, AckStatus, DevicePayload, MetricValue, Reading, ReadingBatch, Record, SourceProtocol,
};
