//! The blackhole sink: counts and discards. Measures the ingest path without a sink's cost.

use std::sync::Arc;

use super::{Pending, Sink, SinkError, WriteReport};
use crate::fabric::Batch;
use crate::fabric::Payload;

#[derive(Debug, Default)]
pub struct BlackholeSink;

impl Sink for BlackholeSink {
    fn name(&self) -> &'static str {
        "blackhole"
    }

    async fn submit(&mut self, batch: Arc<Batch>) -> Result<Pending, SinkError> {
        let dead_letters = batch.items.iter().filter(|i| matches!(i.payload, Payload::DeadLetter(_))).count();
        let report = WriteReport { records: batch.len() - dead_letters, duplicates: 0, dead_letters };
        Ok(Box::pin(std::future::ready(Ok(report))))
    }
}
