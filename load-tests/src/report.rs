//! The JSON result of one load run, and the one-line comparison of a run against its baseline.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// What `weir-load flood` prints on stdout: one JSON object per run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FloodReport {
    /// Free-form name of the target, e.g. `mosquitto` or `weir-blackhole`.
    pub label: String,
    /// CPUs the generator saw; on a small host the target shares them with the generator.
    pub host_cpus: usize,
    pub scenario: Scenario,
    /// Publishes written to the socket.
    pub sent: u64,
    /// PUBACKs received (always 0 at QoS 0).
    pub acked: u64,
    /// Connections that failed to connect, broke mid-run, or still had unacked publishes when
    /// the drain timeout ended them.
    pub errors: u64,
    /// From the common start until the last ack (QoS 1) or the last write (QoS 0).
    pub elapsed_secs: f64,
    /// `acked / elapsed_secs` at QoS 1, `sent / elapsed_secs` at QoS 0.
    pub msgs_per_sec: f64,
    /// Publish-to-PUBACK latency; `null` at QoS 0.
    pub ack_latency_ms: Option<LatencySummary>,
    /// Every device's sequence starts here.
    pub first_seq: u64,
    /// The highest seq any device sent; with `first_seq` this bounds the keys a sink should hold.
    pub last_seq_per_device_max: u64,
}

/// The run's shape, echoed so a result line explains itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scenario {
    pub connections: usize,
    pub qos: u8,
    pub payload_bytes: usize,
    pub duration_secs: u64,
}

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct LatencySummary {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl LatencySummary {
    /// Summarises a histogram recorded in microseconds; `None` when it is empty.
    pub fn from_micros(histogram: &Histogram<u64>) -> Option<Self> {
        if histogram.is_empty() {
            return None;
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        Some(Self {
            p50: ms(histogram.value_at_quantile(0.50)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p999: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
        })
    }
}

/// One human-readable line comparing a candidate run (weir) with its baseline (Mosquitto).
pub fn comparison_line(scenario: &str, baseline: &FloodReport, candidate: &FloodReport) -> String {
    let ratio = if baseline.msgs_per_sec > 0.0 {
        format!("{:.2}", candidate.msgs_per_sec / baseline.msgs_per_sec)
    } else {
        "n/a".to_owned()
    };
    let p99 = |report: &FloodReport| match report.ack_latency_ms {
        Some(latency) => format!("{:.3}ms", latency.p99),
        None => "n/a".to_owned(),
    };
    let mut line = format!(
        "SUMMARY {scenario}: {c}/{b} msgs/s ratio={ratio} ({c} {cr:.0}/s, {b} {br:.0}/s); \
         p99 {c}={cp} {b}={bp}",
        c = candidate.label,
        b = baseline.label,
        cr = candidate.msgs_per_sec,
        br = baseline.msgs_per_sec,
        cp = p99(candidate),
        bp = p99(baseline),
    );
    for report in [candidate, baseline] {
        if report.errors > 0 {
            line.push_str(&format!("; WARNING {} had {} errors", report.label, report.errors));
        }
        if report.scenario.qos == 1 && report.acked < report.sent {
            line.push_str(&format!(
                "; WARNING {} left {} publishes unacked",
                report.label,
                report.sent - report.acked
            ));
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(label: &str, msgs_per_sec: f64, p99: Option<f64>) -> FloodReport {
        FloodReport {
            label: label.into(),
            host_cpus: 2,
            scenario: Scenario { connections: 10, qos: 1, payload_bytes: 128, duration_secs: 3 },
            sent: 100,
            acked: 100,
            errors: 0,
            elapsed_secs: 1.0,
            msgs_per_sec,
            ack_latency_ms: p99.map(|p99| LatencySummary { p50: 0.5, p99, p999: 2.0 * p99, max: 3.0 * p99 }),
            first_seq: 1,
            last_seq_per_device_max: 10,
        }
    }

    #[test]
    fn latency_is_reported_in_milliseconds() {
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for micros in [100, 200, 1500] {
            histogram.record(micros).unwrap();
        }
        let summary = LatencySummary::from_micros(&histogram).unwrap();
        assert!((summary.p50 - 0.2).abs() < 0.001);
        assert!((summary.max - 1.5).abs() < 0.002);
        assert!(LatencySummary::from_micros(&Histogram::new(3).unwrap()).is_none());
    }

    #[test]
    fn report_serialises_null_latency_at_qos0() {
        let json = serde_json::to_value(report("m", 1.0, None)).unwrap();
        assert!(json["ack_latency_ms"].is_null());
        assert_eq!(json["scenario"]["qos"], 1);
    }

    #[test]
    fn comparison_line_has_ratio_and_both_p99s() {
        let line = comparison_line(
            "qos1-blackhole",
            &report("mosquitto", 2000.0, Some(1.25)),
            &report("weir", 1000.0, Some(4.0)),
        );
        assert!(line.contains("ratio=0.50"), "{line}");
        assert!(line.contains("p99 weir=4.000ms mosquitto=1.250ms"), "{line}");
        assert!(!line.contains("WARNING"), "{line}");
    }
}
