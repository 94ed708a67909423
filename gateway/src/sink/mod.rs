//! Sinks and the sink driver: the driver takes a batch only when the previous one is done,
//! retries retriable errors with backoff (pressure builds back to the devices meanwhile), and
//! settles every record's ack after the commit.

mod blackhole;
mod sqlite;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use weir_proto::SourceProtocol;
use weir_protocols::mqtt::session::Outcome;

pub use blackhole::BlackholeSink;
pub use sqlite::SqliteSink;

use crate::fabric::Batch;
use crate::metrics::{Metrics, ReasonLabel};

/// What a committed batch held.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteReport {
    /// Records written, duplicates included.
    pub records: usize,
    /// Records the sink already had (same device_id and seq), ignored.
    pub duplicates: usize,
    pub dead_letters: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Worth retrying: the sink is busy, unreachable or out of space for now.
    #[error("{0} (will retry)")]
    Retriable(String),
    /// Retrying cannot help; the batch's devices are not acked and will resend.
    #[error("{0}")]
    Fatal(String),
}

/// A destination for batches. `write` commits the whole batch or fails; it shares the batch
/// (it may hand it to a blocking thread) and the driver settles the acks afterwards.
pub trait Sink: Send + 'static {
    fn name(&self) -> &'static str;
    fn write(&mut self, batch: Arc<Batch>) -> impl Future<Output = Result<WriteReport, SinkError>> + Send;
}

/// Lowercase protocol name as stored in sinks.
pub fn protocol_name(protocol: SourceProtocol) -> &'static str {
    match protocol {
        SourceProtocol::Mqtt => "mqtt",
        SourceProtocol::MqttWs => "mqtt_ws",
        SourceProtocol::Websocket => "ws",
        SourceProtocol::Tcp => "tcp",
        SourceProtocol::Http => "http",
        SourceProtocol::MqttBridge => "mqtt_bridge",
        SourceProtocol::Unspecified => "unspecified",
    }
}

const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Writes batches until the batchers are gone (input ended) or `abort` turns true (the grace
/// period is over: the batch in hand fails, its devices are not acked).
pub async fn run_sink_driver<S: Sink>(
    mut sink: S,
    batches_rx: flume::Receiver<Batch>,
    metrics: Arc<Metrics>,
    mut abort: watch::Receiver<bool>,
) {
    metrics.sink_ready.set(1);
    while let Ok(batch) = batches_rx.recv_async().await {
        let batch = Arc::new(batch);
        let started = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match sink.write(Arc::clone(&batch)).await {
                Ok(report) => {
                    metrics.sink_ready.set(1);
                    metrics.sink_batch_seconds.observe(started.elapsed().as_secs_f64());
                    metrics.sink_batch_records.observe(batch.len() as f64);
                    metrics.records_committed.inc_by(report.records as u64);
                    metrics.records_duplicate.inc_by(report.duplicates as u64);
                    metrics.dead_letters_committed.inc_by(report.dead_letters as u64);
                    if attempt > 1 {
                        tracing::info!(sink = sink.name(), attempt, "sink write succeeded after retries");
                    }
                    match Arc::try_unwrap(batch) {
                        Ok(batch) => batch.settle(Outcome::Stored),
                        // A sink kept a share of the batch: its acks cannot be settled here,
                        // so they fail rather than claim a commit nobody can vouch for.
                        Err(_) => tracing::error!(
                            sink = sink.name(),
                            "sink kept a batch; its devices were not acked"
                        ),
                    }
                    break;
                }
                Err(SinkError::Retriable(error)) => {
                    metrics.sink_ready.set(0);
                    metrics.sink_errors.get_or_create(&ReasonLabel { reason: "retriable" }).inc();
                    if attempt.is_power_of_two() {
                        tracing::warn!(sink = sink.name(), attempt, %error, records = batch.len(), "sink write failed; retrying");
                    }
                    let aborted = tokio::select! {
                        _ = tokio::time::sleep(backoff) => false,
                        _ = crate::shutdown::signalled(&mut abort) => true,
                    };
                    if aborted {
                        tracing::warn!(
                            sink = sink.name(),
                            records = batch.len(),
                            "shutdown grace period over; batch not stored, its devices were not acked"
                        );
                        metrics.records_failed.inc_by(batch.len() as u64);
                        break;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(SinkError::Fatal(error)) => {
                    metrics.sink_errors.get_or_create(&ReasonLabel { reason: "fatal" }).inc();
                    metrics.records_failed.inc_by(batch.len() as u64);
                    tracing::error!(sink = sink.name(), %error, records = batch.len(), "sink write failed for good; devices were not acked and will resend");
                    break;
                }
            }
        }
    }
}
