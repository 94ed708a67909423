//! Counters every device writes and the once-a-second ticker reads: totals, per-group totals, the
//! current second's latency histogram, and errors by reason.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;
use tokio::time::{Duration, Instant};

use crate::device::new_latency_histogram;

/// Latency samples a device keeps before taking the shared histograms' locks, and the longest it
/// keeps them (so a slow device's samples land in about the right second).
const FLUSH_SAMPLES: usize = 64;
const FLUSH_AFTER: Duration = Duration::from_millis(100);

/// Distinct error reasons kept; later new ones are counted under one "other" entry.
const MAX_ERROR_REASONS: usize = 64;

/// Counters of one group, or of the whole run.
#[derive(Debug, Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    /// Messages the server answered with an error.
    pub refused: AtomicU64,
    /// Connections that failed or broke, and messages still unanswered at the drain deadline.
    pub errors: AtomicU64,
    pub reconnects: AtomicU64,
    /// Messages written again after a reconnect, with the seq they had.
    pub resent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub connected: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// What one group shares between its devices.
#[derive(Debug)]
pub struct GroupStats {
    pub counters: Counters,
    latency: Mutex<Histogram<u64>>,
}

impl GroupStats {
    pub fn latency(&self) -> Histogram<u64> {
        self.latency.lock().expect("latency lock").clone()
    }
}

/// What the whole run shares.
#[derive(Debug)]
pub struct Stats {
    pub total: Counters,
    pub groups: Vec<GroupStats>,
    /// Latencies since the ticker last took them.
    second: Mutex<Histogram<u64>>,
    connected_peak: AtomicU64,
    /// Microseconds from the start to the latest ack or write; the run's throughput is over this.
    last_progress_micros: AtomicU64,
    errors_by_reason: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    pub fn new(groups: usize) -> Self {
        Self {
            total: Counters::default(),
            groups: (0..groups)
                .map(|_| GroupStats {
                    counters: Counters::default(),
                    latency: Mutex::new(new_latency_histogram()),
                })
                .collect(),
            second: Mutex::new(new_latency_histogram()),
            connected_peak: AtomicU64::new(0),
            last_progress_micros: AtomicU64::new(0),
            errors_by_reason: Mutex::new(BTreeMap::new()),
        }
    }

    /// Adds `n` to a counter of the run and of `group`.
    pub fn count(&self, group: usize, which: impl Fn(&Counters) -> &AtomicU64, n: u64) {
        Counters::add(which(&self.total), n);
        Counters::add(which(&self.groups[group].counters), n);
    }

    pub fn connected(&self, group: usize) {
        self.count(group, |c| &c.connected, 1);
        let now = Counters::get(&self.total.connected);
        self.connected_peak.fetch_max(now, Ordering::Relaxed);
    }

    pub fn disconnected(&self, group: usize) {
        self.total.connected.fetch_sub(1, Ordering::Relaxed);
        self.groups[group].counters.connected.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn connected_peak(&self) -> u64 {
        self.connected_peak.load(Ordering::Relaxed)
    }

    /// One error of `group`, with the reason kept for the report.
    pub fn error(&self, group: usize, reason: &str, n: u64) {
        self.count(group, |c| &c.errors, n);
        self.note_reason(reason, n);
    }

    /// Keeps `n` more of `reason` (errors, refusals) for the report.
    pub fn note_reason(&self, reason: &str, n: u64) {
        let mut reasons = self.errors_by_reason.lock().expect("errors lock");
        let key = if reasons.len() < MAX_ERROR_REASONS || reasons.contains_key(reason) {
            reason.to_owned()
        } else {
            "(other reasons)".to_owned()
        };
        *reasons.entry(key).or_default() += n;
    }

    pub fn errors_by_reason(&self) -> BTreeMap<String, u64> {
        self.errors_by_reason.lock().expect("errors lock").clone()
    }

    pub fn progress_at(&self, micros_since_start: u64) {
        self.last_progress_micros.fetch_max(micros_since_start, Ordering::Relaxed);
    }

    pub fn last_progress_secs(&self) -> f64 {
        self.last_progress_micros.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// The latencies recorded since the last call, leaving an empty histogram behind.
    pub fn take_second(&self) -> Histogram<u64> {
        let mut second = self.second.lock().expect("latency lock");
        let taken = second.clone();
        second.reset();
        taken
    }
}

/// One device's latency samples (microseconds) on their way to the shared histograms.
#[derive(Debug)]
pub struct LatencyBuffer {
    samples: Vec<u64>,
    last_flush: Instant,
}

impl LatencyBuffer {
    pub fn new(now: Instant) -> Self {
        Self { samples: Vec::new(), last_flush: now }
    }

    pub fn record(&mut self, stats: &Stats, group: usize, micros: u64, now: Instant) {
        self.samples.push(micros.max(1));
        if self.samples.len() >= FLUSH_SAMPLES || now.duration_since(self.last_flush) >= FLUSH_AFTER {
            self.flush(stats, group, now);
        }
    }

    pub fn flush(&mut self, stats: &Stats, group: usize, now: Instant) {
        self.last_flush = now;
        if self.samples.is_empty() {
            return;
        }
        for histogram in [&stats.second, &stats.groups[group].latency] {
            let mut histogram = histogram.lock().expect("latency lock");
            for &micros in &self.samples {
                histogram.saturating_record(micros);
            }
        }
        self.samples.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_reach_the_second_and_the_group_once_flushed() {
        let stats = Stats::new(2);
        let now = Instant::now();
        let mut buffer = LatencyBuffer::new(now);
        buffer.record(&stats, 1, 500, now);
        assert!(stats.take_second().is_empty(), "kept until 64 samples or 100 ms");
        buffer.record(&stats, 1, 1500, now + FLUSH_AFTER);
        let second = stats.take_second();
        assert_eq!(second.len(), 2);
        assert!(stats.take_second().is_empty(), "taking a second resets it");
        assert_eq!(stats.groups[1].latency().len(), 2);
        assert!(stats.groups[0].latency().is_empty());
    }

    #[test]
    fn counters_add_to_the_run_and_the_group_and_errors_keep_reasons() {
        let stats = Stats::new(2);
        stats.count(0, |c| &c.sent, 3);
        stats.connected(1);
        stats.connected(1);
        stats.disconnected(1);
        stats.error(1, "connect failed", 2);
        assert_eq!(Counters::get(&stats.total.sent), 3);
        assert_eq!(Counters::get(&stats.groups[0].counters.sent), 3);
        assert_eq!(Counters::get(&stats.total.connected), 1);
        assert_eq!(stats.connected_peak(), 2);
        assert_eq!(stats.errors_by_reason()["connect failed"], 2);
        assert_eq!(Counters::get(&stats.groups[1].counters.errors), 2);
    }
}
