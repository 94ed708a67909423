//! The JSON result of one load run, its per-device counts, and the one-line comparisons of a run
//! against its baseline.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::targets::TargetCount;

/// What one device (or one simulated device of the raw producer) sent and had acknowledged.
/// Seqs start at 1 and are published in order, so `1..=sent` were published and, acks arriving
/// in publish order, `1..=acked_through` were all acknowledged (PUBACK at QoS 1, delivery report
/// from Kafka for the raw producer; always 0 at QoS 0, which promises nothing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCount {
    /// Highest seq published.
    pub sent: u64,
    /// Highest seq acknowledged; a sink must hold every seq from 1 up to it.
    pub acked_through: u64,
}

/// Per-device counts keyed by device id (the MQTT client id, also the payload's `device_id`).
pub type DeviceCounts = BTreeMap<String, DeviceCount>;

/// Writes `{"device": {"sent": n, "acked_through": n}, ...}` to `path`.
pub fn write_device_counts(path: &Path, devices: &DeviceCounts) -> anyhow::Result<()> {
    let json = serde_json::to_vec(devices)?;
    std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
}

/// Reads a file written by [`write_device_counts`] (`--devices-out`).
pub fn read_device_counts(path: &Path) -> anyhow::Result<DeviceCounts> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("parsing the device counts in {}", path.display()))
}

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
    /// Connections devices opened again after losing one (`flood --reconnect` only).
    #[serde(default)]
    pub reconnects: u64,
    /// Publishes written again after a reconnect, same seq (`flood --reconnect` only): the most
    /// duplicates the devices themselves can cause.
    #[serde(default)]
    pub resent: u64,
    /// Per server (`flood` only, in `--targets` order, or the one `--host:--port`): devices
    /// assigned, connections accepted, reconnects, failed connects, broken connections, and
    /// where each device ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<TargetCount>,
    /// CPU time (user + system) the server process used from the common start to the end of
    /// the run (`flood --cpu-pid` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_cpu_secs: Option<f64>,
    /// `target_cpu_secs` per completed message (acknowledged at QoS 1, written at QoS 0), in
    /// microseconds (`flood --cpu-pid` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_us_per_msg: Option<f64>,
    /// Every device's counts, for the verifier; kept out of the one-line JSON report (the CLI
    /// writes them to `--devices-out`).
    #[serde(skip)]
    pub devices: DeviceCounts,
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
    push_run_warnings(&mut line, [candidate, baseline]);
    line
}

/// Appends a WARNING for each run that had errors or, at QoS 1, left publishes unacked.
fn push_run_warnings<'a>(line: &mut String, reports: impl IntoIterator<Item = &'a FloodReport>) {
    for report in reports {
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
}

/// What [`comparison_line`] appends for a throughput target: `; target {candidate}/{baseline}
/// ratio>=R: met|MISSED`.
pub fn ratio_target(baseline: &FloodReport, candidate: &FloodReport, min_ratio: f64) -> String {
    let met = baseline.msgs_per_sec > 0.0 && candidate.msgs_per_sec >= min_ratio * baseline.msgs_per_sec;
    format!(
        "; target {}/{} ratio>={min_ratio:.2}: {}",
        candidate.label,
        baseline.label,
        if met { "met" } else { "MISSED" }
    )
}

/// What [`comparison_line`] appends for an absolute throughput target: `; target {candidate} >=
/// N msgs/s: met|MISSED`.
pub fn rate_target(candidate: &FloodReport, min_msgs_per_sec: f64) -> String {
    let met = candidate.msgs_per_sec >= min_msgs_per_sec;
    format!(
        "; target {} >= {min_msgs_per_sec:.0} msgs/s: {}",
        candidate.label,
        if met { "met" } else { "MISSED" }
    )
}

/// One line comparing the latency percentiles of two paced runs (same offered load), with the
/// candidate's p99 checked against `p99_target_ms` when given. When the candidate delivered
/// under 95% of the baseline's rate it could not keep up with the offered load, and the line
/// says its latencies are those of saturation.
pub fn latency_line(
    scenario: &str,
    baseline: &FloodReport,
    candidate: &FloodReport,
    p99_target_ms: Option<f64>,
) -> String {
    let percentiles = |report: &FloodReport| match report.ack_latency_ms {
        Some(l) => format!("p50={:.3}ms p99={:.3}ms p999={:.3}ms", l.p50, l.p99, l.p999),
        None => "no latency samples".to_owned(),
    };
    let mut line = format!(
        "SUMMARY {scenario}: {c} {cr:.0}/s {cl}; {b} {br:.0}/s {bl}",
        c = candidate.label,
        b = baseline.label,
        cr = candidate.msgs_per_sec,
        br = baseline.msgs_per_sec,
        cl = percentiles(candidate),
        bl = percentiles(baseline),
    );
    if let Some(target) = p99_target_ms {
        let verdict = match candidate.ack_latency_ms {
            Some(l) if l.p99 <= target => "met",
            Some(_) => "MISSED",
            None => "not measured",
        };
        line.push_str(&format!("; target {} p99<={target}ms: {verdict}", candidate.label));
    }
    if candidate.msgs_per_sec < 0.95 * baseline.msgs_per_sec {
        line.push_str(&format!(
            "; WARNING {} did not keep up with the offered load ({:.0}/s of {:.0}/s): saturated, \
             not paced, latencies",
            candidate.label, candidate.msgs_per_sec, baseline.msgs_per_sec
        ));
    }
    for report in [candidate, baseline] {
        if report.errors > 0 {
            line.push_str(&format!("; WARNING {} had {} errors", report.label, report.errors));
        }
    }
    line
}

/// One line comparing the server CPU per message of two runs at the same offered load (`flood
/// --cpu-pid`), with the candidate/baseline ratio checked against `max_ratio` when given:
/// `SUMMARY {scenario}: cpu/msg {c} X us, {b} Y us, ratio R; target ratio <= M: met|MISSED`.
/// The rates follow, and warnings when a run completed (acknowledged at QoS 1) under 95% of
/// the messages offered (`offered` msgs/s, when given, times the run's duration: the server or
/// the generator could not keep up), when the two runs did not complete the same number of
/// messages (so the comparison is not like for like), or when they had errors. Messages, not
/// rates: a paced run that ends a little late (a lagging tail) still carried its whole load.
pub fn cpu_line(
    scenario: &str,
    baseline: &FloodReport,
    candidate: &FloodReport,
    max_ratio: Option<f64>,
    offered: Option<f64>,
) -> String {
    let micros = |report: &FloodReport| match report.cpu_us_per_msg {
        Some(us) => format!("{us:.2} us"),
        None => "not measured".to_owned(),
    };
    let ratio = match (candidate.cpu_us_per_msg, baseline.cpu_us_per_msg) {
        (Some(c), Some(b)) if b > 0.0 => Some(c / b),
        _ => None,
    };
    let mut line = format!(
        "SUMMARY {scenario}: cpu/msg {c} {cu}, {b} {bu}, ratio {r}",
        c = candidate.label,
        b = baseline.label,
        cu = micros(candidate),
        bu = micros(baseline),
        r = ratio.map_or_else(|| "n/a".to_owned(), |r| format!("{r:.2}")),
    );
    if let Some(max_ratio) = max_ratio {
        let verdict = match ratio {
            Some(r) if r <= max_ratio => "met",
            Some(_) => "MISSED",
            None => "not measured",
        };
        line.push_str(&format!("; target ratio <= {max_ratio}: {verdict}"));
    }
    let cpu = |report: &FloodReport| {
        report.target_cpu_secs.map_or_else(|| "?".to_owned(), |secs| format!("{secs:.2}"))
    };
    let offered_text = offered.map_or_else(String::new, |rate| format!("offered {rate:.0} msgs/s; "));
    line.push_str(&format!(
        " ({offered_text}{c} {cr:.0} msgs/s, {cc} CPU s; {b} {br:.0} msgs/s, {bc} CPU s)",
        c = candidate.label,
        b = baseline.label,
        cr = candidate.msgs_per_sec,
        br = baseline.msgs_per_sec,
        cc = cpu(candidate),
        bc = cpu(baseline),
    ));
    let completed = |report: &FloodReport| if report.scenario.qos == 1 { report.acked } else { report.sent };
    if let Some(rate) = offered {
        for report in [candidate, baseline] {
            let total = (rate * report.scenario.duration_secs as f64).round();
            if (completed(report) as f64) < 0.95 * total {
                line.push_str(&format!(
                    "; WARNING {} completed {} of the {total:.0} messages offered",
                    report.label,
                    completed(report)
                ));
            }
        }
    }
    let (low, high) = if completed(candidate) < completed(baseline) {
        (candidate, baseline)
    } else {
        (baseline, candidate)
    };
    if (completed(low) as f64) < 0.95 * completed(high) as f64 {
        line.push_str(&format!(
            "; WARNING {} completed {} messages against {}'s {}: not the same load, CPU per message \
             not like for like",
            low.label,
            completed(low),
            high.label,
            completed(high)
        ));
    }
    push_run_warnings(&mut line, [candidate, baseline]);
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
            reconnects: 0,
            resent: 0,
            targets: Vec::new(),
            target_cpu_secs: None,
            cpu_us_per_msg: None,
            devices: DeviceCounts::new(),
        }
    }

    fn with_cpu(mut report: FloodReport, cpu_secs: f64) -> FloodReport {
        report.target_cpu_secs = Some(cpu_secs);
        report.cpu_us_per_msg = Some(cpu_secs * 1e6 / report.acked as f64);
        report
    }

    #[test]
    fn cpu_line_has_both_figures_the_ratio_and_the_target() {
        // 100 messages each: 0.0002 s is 2 us per message, 0.0005 s is 5 us.
        let mosquitto = with_cpu(report("mosquitto", 1000.0, Some(1.0)), 0.0005);
        let weir = with_cpu(report("weir-blackhole", 990.0, Some(1.0)), 0.0002);
        let line = cpu_line("devices-10k", &mosquitto, &weir, Some(0.5), None);
        assert_eq!(
            line,
            "SUMMARY devices-10k: cpu/msg weir-blackhole 2.00 us, mosquitto 5.00 us, ratio 0.40; \
             target ratio <= 0.5: met (weir-blackhole 990 msgs/s, 0.00 CPU s; mosquitto 1000 msgs/s, \
             0.00 CPU s)"
        );
        // 100 messages in 3 s is what 33.4 msgs/s offers; rates differ by a late tail only.
        let late = with_cpu(report("weir", 25.0, None), 0.0003);
        let missed = cpu_line("d", &mosquitto, &late, Some(0.5), Some(33.4));
        assert!(
            missed.contains("ratio 0.60; target ratio <= 0.5: MISSED (offered 33 msgs/s; weir 25"),
            "{missed}"
        );
        assert!(!missed.contains("WARNING"), "{missed}");
        let no_target = cpu_line("d", &mosquitto, &weir, None, None);
        assert!(!no_target.contains("target"), "{no_target}");
    }

    #[test]
    fn cpu_line_says_when_it_cannot_compare() {
        let mosquitto = with_cpu(report("mosquitto", 1000.0, None), 0.0005);
        let unmeasured = cpu_line("d", &mosquitto, &report("weir", 1000.0, None), Some(0.5), None);
        assert!(
            unmeasured.starts_with(
                "SUMMARY d: cpu/msg weir not measured, mosquitto 5.00 us, ratio n/a; target ratio <= 0.5: \
                 not measured (weir 1000 msgs/s, ? CPU s;"
            ),
            "{unmeasured}"
        );
        let mut behind = report("weir", 800.0, None);
        (behind.acked, behind.errors) = (80, 3);
        let behind = with_cpu(behind, 0.0001);
        let line = cpu_line("d", &mosquitto, &behind, Some(0.5), Some(33.4));
        assert!(
            line.ends_with(
                "; WARNING weir completed 80 of the 100 messages offered; WARNING weir completed 80 \
                 messages against mosquitto's 100: not the same load, CPU per message not like for \
                 like; WARNING weir had 3 errors; WARNING weir left 20 publishes unacked"
            ),
            "{line}"
        );
        // Both short of the offered load: each is named, though they match each other.
        let both =
            cpu_line("d", &mosquitto, &with_cpu(report("weir", 1000.0, None), 0.0001), None, Some(50.0));
        assert!(both.contains("WARNING weir completed 100 of the 150 messages offered"), "{both}");
        assert!(both.contains("WARNING mosquitto completed 100 of the 150 messages offered"), "{both}");
        assert!(!both.contains("not the same load"), "{both}");
    }

    #[test]
    fn reports_without_cpu_figures_still_parse() {
        let line = serde_json::to_string(&report("old", 1.0, None)).unwrap();
        assert!(!line.contains("cpu_"), "{line}");
        let parsed: FloodReport = serde_json::from_str(&line).unwrap();
        assert_eq!((parsed.target_cpu_secs, parsed.cpu_us_per_msg), (None, None));
        let measured = serde_json::to_string(&with_cpu(report("new", 1.0, None), 0.5)).unwrap();
        assert!(measured.contains(r#""target_cpu_secs":0.5,"cpu_us_per_msg":5000.0"#), "{measured}");
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

    #[test]
    fn ratio_target_says_met_or_missed() {
        let raw = report("raw-copy", 1000.0, Some(2.0));
        assert_eq!(
            ratio_target(&raw, &report("weir-postgres", 800.0, Some(4.0)), 0.8),
            "; target weir-postgres/raw-copy ratio>=0.80: met"
        );
        assert!(ratio_target(&raw, &report("weir-postgres", 799.0, None), 0.8).ends_with("MISSED"));
        assert!(ratio_target(&report("raw-copy", 0.0, None), &raw, 0.8).ends_with("MISSED"));
    }

    #[test]
    fn rate_target_says_met_or_missed() {
        assert_eq!(
            rate_target(&report("weir-sqlite", 300_000.0, None), 300_000.0),
            "; target weir-sqlite >= 300000 msgs/s: met"
        );
        assert!(rate_target(&report("weir-sqlite", 299_999.0, None), 300_000.0).ends_with("MISSED"));
    }

    #[test]
    fn latency_line_checks_the_candidate_p99_target() {
        let baseline = report("raw-producer", 5000.0, Some(3.0));
        let met = latency_line("half", &baseline, &report("weir-kafka", 5000.0, Some(20.0)), Some(25.0));
        assert!(met.contains("weir-kafka 5000/s p50=0.500ms p99=20.000ms p999=40.000ms"), "{met}");
        assert!(met.contains("raw-producer 5000/s p50=0.500ms p99=3.000ms"), "{met}");
        assert!(met.ends_with("target weir-kafka p99<=25ms: met"), "{met}");
        let missed = latency_line("half", &baseline, &report("weir-kafka", 5000.0, Some(30.0)), Some(25.0));
        assert!(missed.contains("MISSED"), "{missed}");
        assert!(!missed.contains("WARNING"), "{missed}");
        let unmeasured = latency_line("half", &baseline, &report("weir-kafka", 0.0, None), None);
        assert!(unmeasured.contains("weir-kafka 0/s no latency samples"), "{unmeasured}");
        let saturated =
            latency_line("half", &baseline, &report("weir-kafka", 4000.0, Some(90.0)), Some(25.0));
        assert!(
            saturated.ends_with(
                "MISSED; WARNING weir-kafka did not keep up with the offered load (4000/s of 5000/s): \
                 saturated, not paced, latencies"
            ),
            "{saturated}"
        );
    }

    #[test]
    fn device_counts_stay_out_of_the_report_line_and_round_trip_through_a_file() {
        let mut with_devices = report("weir", 1.0, Some(1.0));
        with_devices.devices.insert("d-1".into(), DeviceCount { sent: 5, acked_through: 4 });
        let line = serde_json::to_string(&with_devices).unwrap();
        assert!(!line.contains("d-1"), "{line}");
        let parsed: FloodReport = serde_json::from_str(&line).unwrap();
        assert!(parsed.devices.is_empty());

        let dir = std::env::temp_dir().join(format!("weir-load-devices-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("devices.json");
        write_device_counts(&path, &with_devices.devices).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, r#"{"d-1":{"sent":5,"acked_through":4}}"#);
        assert_eq!(read_device_counts(&path).unwrap(), with_devices.devices);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
