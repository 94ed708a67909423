//! Sinks and the sink driver: the driver takes a batch only when the previous one is done,
//! retries retriable errors with backoff (pressure builds back to the devices meanwhile), and
//! settles every record's ack after the commit.

mod blackhole;
pub mod kafka;
pub mod postgres;
mod sqlite;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio::sync::watch;
use weir_protocols::mqtt::session::Outcome;

pub use weir_protocols::record_json::protocol_name;

pub use blackhole::BlackholeSink;
pub use kafka::KafkaSink;
pub use postgres::PostgresSink;
pub use sqlite::SqliteSink;

use crate::buffer::CommitLog;
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

/// A batch's write in progress: resolves when the sink committed it or failed.
pub type Pending = Pin<Box<dyn Future<Output = Result<WriteReport, SinkError>> + Send>>;

/// A destination for batches. The driver submits batches in order, at most
/// [`Sink::max_in_flight`] at once, and settles their acks in order as they complete.
pub trait Sink: Send + 'static {
    fn name(&self) -> &'static str;

    /// Batches written concurrently. Submission order is the order records reach the sink, so
    /// a sink that keeps order across concurrent writes (Kafka's idempotent producer) may allow
    /// more than one.
    fn max_in_flight(&self) -> usize {
        1
    }

    /// Batches already waiting are merged up to this many records into one write, so a sink
    /// that pays per commit (an fsync) pays once for them (group commit). 0: no merging.
    fn merge_up_to(&self) -> usize {
        0
    }

    /// Starts writing `batch`. Waits while the sink cannot take more (its queue is full): that
    /// wait is the backpressure. The returned future completes the write.
    fn submit(&mut self, batch: Arc<Batch>) -> impl Future<Output = Result<Pending, SinkError>> + Send;
}

const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// A submitted batch, when it was taken, and how its write ended.
type InFlight = Pin<Box<dyn Future<Output = (Arc<Batch>, Instant, Result<WriteReport, SinkError>)> + Send>>;

/// Writes batches until the batchers are gone (input ended) or `abort` turns true (the grace
/// period is over: batches in hand fail, their devices are not acked).
///
/// With a disk buffer (`commit_log`), every committed batch is reported to it, and errors
/// retrying cannot fix are retried anyway: the records are acknowledged on disk and must not
/// be dropped, so a sink that keeps failing holds the buffer, which fills and then holds the
/// devices back.
pub async fn run_sink_driver<S: Sink>(
    mut sink: S,
    batches_rx: flume::Receiver<Batch>,
    metrics: Arc<Metrics>,
    mut abort: watch::Receiver<bool>,
    commit_log: Option<Arc<CommitLog>>,
) {
    let retry_fatal = commit_log.is_some();
    let commit_log = commit_log.as_deref();
    metrics.sink_ready.set(1);
    let max_in_flight = sink.max_in_flight().max(1);
    let mut in_flight: FuturesOrdered<InFlight> = FuturesOrdered::new();
    let mut input_open = true;
    while input_open || !in_flight.is_empty() {
        tokio::select! {
            // Completions first: they free room and send acks.
            biased;
            Some((batch, started, result)) = in_flight.next(), if !in_flight.is_empty() => {
                let result = match result {
                    Err(error) if retry_fatal || matches!(error, SinkError::Retriable(_)) => {
                        note_failure(&sink, &metrics, &batch, &error);
                        retry(&mut sink, &batch, &metrics, &mut abort, retry_fatal).await
                    }
                    other => other,
                };
                finish(&sink, &metrics, batch, started, result, commit_log);
            }
            received = batches_rx.recv_async(), if input_open && in_flight.len() < max_in_flight => {
                let Ok(mut batch) = received else {
                    input_open = false;
                    continue;
                };
                while batch.len() < sink.merge_up_to() {
                    match batches_rx.try_recv() {
                        Ok(next) => batch.absorb(next),
                        Err(_) => break,
                    }
                }
                let batch = Arc::new(batch);
                let started = Instant::now();
                let pending = match sink.submit(Arc::clone(&batch)).await {
                    Ok(pending) => pending,
                    Err(error) => {
                        // Later batches wait behind this one: order is kept.
                        let result = if retry_fatal || matches!(error, SinkError::Retriable(_)) {
                            note_failure(&sink, &metrics, &batch, &error);
                            retry(&mut sink, &batch, &metrics, &mut abort, retry_fatal).await
                        } else {
                            Err(error)
                        };
                        // Earlier batches complete before this one is settled.
                        while let Some((b, s, r)) = in_flight.next().await {
                            finish(&sink, &metrics, b, s, r, commit_log);
                        }
                        finish(&sink, &metrics, batch, started, result, commit_log);
                        continue;
                    }
                };
                in_flight.push_back(Box::pin(async move { (batch, started, pending.await) }));
            }
        }
    }
}

/// Submits and awaits `batch` again with backoff until it is written, fails for good (unless
/// `retry_fatal`), or the grace period ends.
async fn retry<S: Sink>(
    sink: &mut S,
    batch: &Arc<Batch>,
    metrics: &Metrics,
    abort: &mut watch::Receiver<bool>,
    retry_fatal: bool,
) -> Result<WriteReport, SinkError> {
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 1u32;
    loop {
        attempt = attempt.saturating_add(1);
        let aborted = tokio::select! {
            _ = tokio::time::sleep(backoff) => false,
            _ = crate::shutdown::signalled(abort) => true,
        };
        if aborted {
            return Err(SinkError::Fatal("shutdown grace period over before the sink recovered".into()));
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
        let result = match sink.submit(Arc::clone(batch)).await {
            Ok(pending) => pending.await,
            Err(error) => Err(error),
        };
        match result {
            Err(error) if retry_fatal || matches!(error, SinkError::Retriable(_)) => {
                metrics.sink_errors.get_or_create(&ReasonLabel { reason: "retriable" }).inc();
                if attempt.is_power_of_two() {
                    tracing::warn!(sink = sink.name(), attempt, %error, records = batch.len(), "sink write failed; retrying");
                }
            }
            done => {
                if done.is_ok() {
                    tracing::info!(sink = sink.name(), attempt, "sink write succeeded after retries");
                }
                return done;
            }
        }
    }
}

fn note_failure<S: Sink>(sink: &S, metrics: &Metrics, batch: &Batch, error: &SinkError) {
    metrics.sink_ready.set(0);
    metrics.sink_errors.get_or_create(&ReasonLabel { reason: "retriable" }).inc();
    tracing::warn!(sink = sink.name(), %error, records = batch.len(), "sink write failed; retrying");
}

/// Counts the outcome and settles the batch's acks: stored on success; on failure the tokens
/// drop unsettled, so the devices are not acked and resend.
fn finish<S: Sink>(
    sink: &S,
    metrics: &Metrics,
    batch: Arc<Batch>,
    started: Instant,
    result: Result<WriteReport, SinkError>,
    commit_log: Option<&CommitLog>,
) {
    match result {
        Ok(report) => {
            if let (Some(log), Some(wal_end)) = (commit_log, batch.wal_end) {
                log.committed(wal_end);
            }
            metrics.sink_ready.set(1);
            metrics.sink_batch_seconds.observe(started.elapsed().as_secs_f64());
            metrics.sink_batch_records.observe(batch.len() as f64);
            metrics.records_committed.inc_by(report.records as u64);
            metrics.records_duplicate.inc_by(report.duplicates as u64);
            metrics.dead_letters_committed.inc_by(report.dead_letters as u64);
            match Arc::try_unwrap(batch) {
                Ok(batch) => batch.settle(Outcome::Stored),
                // A sink kept a share of the batch: its acks cannot be settled here, so they
                // fail rather than claim a commit nobody can vouch for.
                Err(_) => {
                    tracing::error!(sink = sink.name(), "sink kept a batch; its devices were not acked")
                }
            }
        }
        Err(error) => {
            if let Some(log) = commit_log {
                log.failed();
            }
            metrics.sink_errors.get_or_create(&ReasonLabel { reason: "fatal" }).inc();
            metrics.records_failed.inc_by(batch.len() as u64);
            tracing::error!(sink = sink.name(), %error, records = batch.len(), "batch not stored; its devices were not acked and will resend");
        }
    }
}
