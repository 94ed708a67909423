//! The JSON report of one scenario run (totals, per-group counts, per-second timeline, latency
//! histogram, events, sink verification) that `html::render` turns into a page.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::report::LatencySummary;

/// Everything one scenario run measured, as written to its JSON report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    /// Scenario name, from the scenario file.
    pub name: String,
    /// Free-form name of the target, e.g. `weir` or `mosquitto`.
    pub label: String,
    /// When the run started (the common start of every group), Unix milliseconds.
    pub started_unix_ms: u64,
    /// One line describing the generator's host: CPUs, model, kernel.
    pub machine: String,
    /// The scenario file's text, echoed verbatim so the report explains itself.
    pub scenario_toml: String,
    pub totals: RunTotals,
    /// One entry per device group of the scenario, in file order.
    #[serde(default)]
    pub groups: Vec<GroupTotals>,
    /// Whole-run publish-to-ack latency; `null` when nothing was acknowledged (QoS 0 only).
    pub latency_ms: Option<LatencySummary>,
    /// Whole-run latency histogram, log-spaced buckets (see [`histogram_buckets`]).
    #[serde(default)]
    pub histogram: Vec<HistogramBucket>,
    /// One point per second of the run, in time order.
    #[serde(default)]
    pub timeline: Vec<TimelinePoint>,
    /// Things the scenario did on purpose (ramp end, reconnect storms, bursts), in time order.
    #[serde(default)]
    pub events: Vec<EventMark>,
    /// The sink read back after the run; `null` when the scenario did not ask for it.
    pub verify: Option<VerifySummary>,
    /// Errors and refusals by reason (the server's reason code or text, the I/O error), with
    /// how often each happened; at most 64 reasons, the rest counted together.
    #[serde(default)]
    pub errors_by_reason: std::collections::BTreeMap<String, u64>,
}

/// Whole-run counts over every group.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunTotals {
    /// Simulated devices over every group.
    pub devices: u64,
    /// Most devices connected at the same time.
    pub connected_peak: u64,
    /// Publishes written to the socket, resends included.
    pub sent: u64,
    /// Publishes acknowledged (PUBACK at QoS 1; always 0 at QoS 0).
    pub acked: u64,
    /// Failed connects, broken connections, and publishes still unacked when the drain ended.
    pub errors: u64,
    /// Publishes the target answered with an error (MQTT 5 PUBACK reason code 0x80 or above, an
    /// error ack frame or JSON answer): not stored. A refused CONNACK is an error, not this.
    pub refused: u64,
    /// Connections devices opened again after losing one.
    pub reconnects: u64,
    /// Publishes written again after a reconnect, same seq: the most duplicates the devices
    /// themselves can cause.
    pub resent: u64,
    /// Payload and protocol bytes written to sockets.
    pub bytes_sent: u64,
    /// From the common start until the last ack (or the last write when nothing is acked).
    pub elapsed_secs: f64,
    /// `acked / elapsed_secs` when anything is acked, else `sent / elapsed_secs`.
    pub msgs_per_sec: f64,
}

/// What one device group of the scenario did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupTotals {
    /// Group name from the scenario file.
    pub name: String,
    /// Protocol the group's devices speak, e.g. `mqtt`, `mqtt5`, `ws`, `tcp`.
    pub protocol: String,
    pub qos: u8,
    /// Payload shape and size, e.g. `json 128 B`.
    pub payload: String,
    pub devices: u64,
    /// Offered publishes per second per device.
    pub rate_per_device: f64,
    pub sent: u64,
    pub acked: u64,
    pub errors: u64,
    pub reconnects: u64,
    /// The group's publish-to-ack latency; `null` when nothing was acknowledged.
    pub latency_ms: Option<LatencySummary>,
}

/// One bar of the latency histogram: samples above the previous bucket's bound, up to this one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HistogramBucket {
    /// Inclusive upper bound, milliseconds.
    pub upper_ms: f64,
    /// Samples in the bucket.
    pub count: u64,
}

/// One second of the run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TimelinePoint {
    /// Seconds since the start; the point covers `[t, t + 1)`.
    pub t: u32,
    /// Publishes written in this second.
    pub sent: u64,
    /// Acks received in this second.
    pub acked: u64,
    /// Errors counted in this second.
    pub errors: u64,
    /// Devices connected at the end of this second.
    pub connected: u64,
    /// Latency of the acks received in this second, milliseconds; `null` when there were none.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

/// Something the scenario did on purpose, marked on the time charts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventMark {
    /// Seconds since the start.
    pub t_secs: f64,
    /// `ramp-up done`, `reconnect storm`, `burst start`, `burst end`.
    pub kind: String,
    /// Free text, e.g. which group and how many devices.
    pub detail: String,
}

/// The sink read back after the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifySummary {
    /// Which sink was read, e.g. `sqlite /path/db`.
    pub sink: String,
    /// True when nothing acknowledged is missing.
    pub passed: bool,
    /// Devices whose records were looked for.
    pub devices: u64,
    /// Publishes the devices had acknowledged: the sink must hold every one.
    pub acked: u64,
    /// Records found in the sink for those devices.
    pub found: u64,
    /// Distinct (device, seq) keys among them.
    pub distinct: u64,
    /// Acknowledged publishes missing from the sink.
    pub lost: u64,
    /// Records beyond the first for the same (device, seq).
    pub duplicates: u64,
}

/// Bucket upper bounds per power of ten, in tenths of the decade's unit: 1, 1.8, 3.2, 5.6
/// (10^(k/4) rounded to two digits, so the bounds read well in JSON and on the chart's axis).
const MANTISSAS_TENTHS: [u128; 4] = [10, 18, 32, 56];

/// Upper bound of bucket `k` in tenths of a microsecond; bucket 0 ends at 1 µs.
fn bound_tenths_of_micros(k: u32) -> u128 {
    MANTISSAS_TENTHS[(k % 4) as usize] * 10u128.pow(k / 4)
}

/// The first bucket whose upper bound holds `micros`.
fn bucket_index(micros: u64) -> u32 {
    let tenths = u128::from(micros) * 10;
    let mut k = 0;
    while bound_tenths_of_micros(k) < tenths {
        k += 1;
    }
    k
}

/// Log-spaced histogram of a latency histogram recorded in microseconds: 4 buckets per power of
/// ten (upper bounds 1, 1.8, 3.2, 5.6 × 10^n ms), from the bucket holding the smallest sample to
/// the one holding the largest, empty buckets in between included so the bars sit on an even
/// log axis. Each recorded value counts at the lowest value hdrhistogram considers equivalent,
/// so a sample of exactly 10 ms lands in the bucket ending at 10 ms. Empty histogram: no buckets.
pub fn histogram_buckets(h: &Histogram<u64>) -> Vec<HistogramBucket> {
    let mut counts: Vec<(u32, u64)> = Vec::new();
    for step in h.iter_recorded() {
        let k = bucket_index(h.lowest_equivalent(step.value_iterated_to()));
        match counts.last_mut() {
            Some((last, count)) if *last == k => *count += step.count_since_last_iteration(),
            _ => counts.push((k, step.count_since_last_iteration())),
        }
    }
    let (Some(&(first, _)), Some(&(last, _))) = (counts.first(), counts.last()) else {
        return Vec::new();
    };
    let mut recorded = counts.into_iter().peekable();
    (first..=last)
        .map(|k| {
            let count = recorded.next_if(|(index, _)| *index == k).map_or(0, |(_, count)| count);
            HistogramBucket { upper_ms: bound_tenths_of_micros(k) as f64 / 10_000.0, count }
        })
        .collect()
}

/// One second of the timeline, its latency percentiles taken from a histogram of that second's
/// acks recorded in microseconds (`None` when it is empty).
pub fn timeline_point(
    t: u32,
    sent: u64,
    acked: u64,
    errors: u64,
    connected: u64,
    h: &Histogram<u64>,
) -> TimelinePoint {
    let latency = LatencySummary::from_micros(h);
    TimelinePoint {
        t,
        sent,
        acked,
        errors,
        connected,
        p50_ms: latency.map(|l| l.p50),
        p99_ms: latency.map(|l| l.p99),
        max_ms: latency.map(|l| l.max),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram(micros: &[u64]) -> Histogram<u64> {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for &value in micros {
            h.record(value).unwrap();
        }
        h
    }

    #[test]
    fn histogram_buckets_are_log_spaced_ascending_and_sum_to_the_count() {
        // 0.25 ms x3, 1 ms, 1.5 ms, 10 ms, 40 ms x2, 2.5 s.
        let h = histogram(&[250, 250, 250, 1_000, 1_500, 10_000, 40_000, 40_000, 2_500_000]);
        let buckets = histogram_buckets(&h);
        assert_eq!(buckets.iter().map(|b| b.count).sum::<u64>(), h.len());
        assert!(buckets.windows(2).all(|w| w[0].upper_ms < w[1].upper_ms), "{buckets:?}");
        // From the bucket holding 0.25 ms, (0.18, 0.32], to the one holding 2.5 s, (1.8 s, 3.2 s]:
        // four decades at 4 buckets per decade, 17 bounds from 0.32 ms to 3200 ms.
        assert_eq!(buckets.first().unwrap(), &HistogramBucket { upper_ms: 0.32, count: 3 });
        assert_eq!(buckets.last().unwrap(), &HistogramBucket { upper_ms: 3200.0, count: 1 });
        assert_eq!(buckets.len(), 17);
        let at = |upper_ms: f64| buckets.iter().find(|b| b.upper_ms == upper_ms).unwrap().count;
        assert_eq!(at(1.0), 1, "1 ms exactly sits in the bucket ending at 1 ms");
        assert_eq!(at(1.8), 1);
        assert_eq!(at(10.0), 1, "10 ms exactly sits in the bucket ending at 10 ms");
        assert_eq!(at(56.0), 2);
        assert_eq!(at(100.0), 0, "empty buckets between samples are kept");
    }

    #[test]
    fn histogram_buckets_of_an_empty_histogram_are_empty() {
        assert!(histogram_buckets(&histogram(&[])).is_empty());
    }

    #[test]
    fn histogram_buckets_hold_a_zero_sample_and_a_single_value() {
        let zero = histogram_buckets(&histogram(&[0, 1]));
        assert_eq!(zero, [HistogramBucket { upper_ms: 0.001, count: 2 }]);
        let one = histogram_buckets(&histogram(&[7_000; 4]));
        assert_eq!(one, [HistogramBucket { upper_ms: 10.0, count: 4 }]);
    }

    #[test]
    fn timeline_point_reports_percentiles_in_milliseconds() {
        let mut micros = vec![2_000; 98];
        micros.extend([30_000, 120_000]);
        let point = timeline_point(7, 100, 100, 1, 50, &histogram(&micros));
        assert_eq!((point.t, point.sent, point.acked, point.errors, point.connected), (7, 100, 100, 1, 50));
        assert!((point.p50_ms.unwrap() - 2.0).abs() < 0.01, "{point:?}");
        assert!((point.p99_ms.unwrap() - 30.0).abs() < 0.05, "{point:?}");
        assert!((point.max_ms.unwrap() - 120.0).abs() < 0.1, "{point:?}");

        let idle = timeline_point(8, 0, 0, 0, 50, &histogram(&[]));
        assert_eq!((idle.p50_ms, idle.p99_ms, idle.max_ms), (None, None, None));
    }

    fn sample_report() -> RunReport {
        RunReport {
            name: "storm".into(),
            label: "weir".into(),
            started_unix_ms: 1_700_000_000_123,
            machine: "2 CPUs, test, Linux 6.1".into(),
            scenario_toml: "name = \"storm\"\n".into(),
            totals: RunTotals { devices: 10, sent: 30, acked: 29, elapsed_secs: 3.0, ..RunTotals::default() },
            groups: vec![GroupTotals {
                name: "sensors".into(),
                protocol: "mqtt".into(),
                qos: 1,
                payload: "json 128 B".into(),
                devices: 10,
                rate_per_device: 1.0,
                sent: 30,
                acked: 29,
                errors: 1,
                reconnects: 0,
                latency_ms: Some(LatencySummary { p50: 1.0, p99: 2.0, p999: 3.0, max: 4.0 }),
            }],
            latency_ms: Some(LatencySummary { p50: 1.0, p99: 2.0, p999: 3.0, max: 4.0 }),
            histogram: vec![HistogramBucket { upper_ms: 1.0, count: 20 }],
            timeline: vec![timeline_point(0, 10, 9, 0, 10, &histogram(&[1_000]))],
            events: vec![EventMark { t_secs: 1.5, kind: "burst start".into(), detail: "x2".into() }],
            verify: Some(VerifySummary {
                sink: "sqlite /tmp/db".into(),
                passed: true,
                devices: 10,
                acked: 29,
                found: 29,
                distinct: 29,
                lost: 0,
                duplicates: 0,
            }),
            errors_by_reason: [("connect: refused".to_owned(), 1)].into(),
        }
    }

    #[test]
    fn run_report_round_trips_through_json() {
        let report = sample_report();
        let json = serde_json::to_string(&report).unwrap();
        let parsed: RunReport = serde_json::from_str(&json).unwrap();
        assert_eq!(serde_json::to_string(&parsed).unwrap(), json);
        assert_eq!(parsed.timeline, report.timeline);
        assert_eq!(parsed.events, report.events);
        assert_eq!(parsed.verify, report.verify);
        assert_eq!(parsed.latency_ms.unwrap().p99, 2.0);

        let value = serde_json::to_value(RunReport { latency_ms: None, verify: None, ..report }).unwrap();
        assert!(value["latency_ms"].is_null() && value["verify"].is_null());
        assert_eq!(value["timeline"][0]["p50_ms"], 1.0);
    }
}
