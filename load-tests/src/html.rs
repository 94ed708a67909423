//! One scenario run's report as a self-contained HTML page: tables and inline SVG charts, no
//! scripts, fonts, images or links to fetch, so it opens offline and can be mailed around.

use crate::idle::utc_timestamp;
use crate::report::LatencySummary;
use crate::run_report::{
    EventMark, GroupTotals, HistogramBucket, RunReport, RunTotals, TimelinePoint, VerifySummary,
};

/// Colours that stay apart in print and for the common colour-vision deficiencies.
const BLUE: &str = "#1f5fa8";
const ORANGE: &str = "#d9730d";
const RED: &str = "#b2182b";
const GREEN: &str = "#2a7f3e";
const GREY: &str = "#555";

const STYLE: &str = "\
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;color:#1a1a1a;\
background:#fff;max-width:1080px;margin:24px auto;padding:0 20px}
h1{font-size:23px;margin:0 0 4px}
h2{font-size:17px;margin:30px 0 10px;padding-bottom:4px;border-bottom:1px solid #ddd}
h3{font-size:14px;margin:18px 0 2px}
figure{margin:0}
.sub{color:#555;margin:0}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;margin:4px 0}
th,td{padding:3px 8px;text-align:right;border-bottom:1px solid #eee;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
thead th{border-bottom:2px solid #bbb;font-weight:600}
tbody th{font-weight:normal;color:#444}
.text,th.text,td.text{text-align:left}
.wide{overflow-x:auto}
.bad{color:#b2182b;font-weight:600}
.warn{color:#8a5300;font-weight:600}
.note{color:#555;font-style:italic;margin:6px 0}
.nodata{color:#555;font-style:italic;padding:14px;border:1px dashed #bbb;margin:6px 0}
.figures{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0 4px}
.figure{border:1px solid #ddd;border-radius:4px;padding:6px 14px;min-width:130px}
.figure span{display:block;color:#555;font-size:12px}
.figure b{font-size:21px;font-variant-numeric:tabular-nums}
.cols{display:flex;flex-wrap:wrap;gap:40px;align-items:flex-start}
.verdict{display:inline-block;font-size:22px;font-weight:700;padding:3px 16px;border:3px solid;border-radius:4px;\
margin:4px 0 10px;-webkit-print-color-adjust:exact;print-color-adjust:exact}
.pass{color:#1b7837;border-color:#1b7837;background:#eef7ef}
.fail{color:#b2182b;border-color:#b2182b;background:#fbecee}
pre{background:#f6f6f6;border:1px solid #ddd;padding:10px;overflow:auto;font-size:12.5px;white-space:pre-wrap}
svg{display:block;width:100%;height:auto}
svg text{font-size:12px;fill:#333}
footer{color:#777;font-size:12px;margin:30px 0 10px}
@media print{body{margin:0;max-width:none}figure,section,table{break-inside:avoid}}
";

/// The whole page for one run.
pub fn render(report: &RunReport) -> String {
    let name = escape(&report.name);
    let label = escape(&report.label);
    let started = utc_timestamp(report.started_unix_ms / 1000).replace('T', " ").replace('Z', " UTC");
    let mut page = String::with_capacity(64 * 1024);
    page += "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n";
    page += "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n";
    page += &format!("<title>weir-load: {name} on {label}, {started}</title>\n");
    page += &format!("<style>\n{STYLE}</style>\n</head>\n<body>\n");
    page += &format!("<header>\n<h1>{name} <span class=\"sub\">on</span> {label}</h1>\n");
    let machine = if report.machine.is_empty() {
        String::new()
    } else {
        format!(" &middot; {}", escape(&report.machine))
    };
    page += &format!("<p class=\"sub\">Started {started}{machine}</p>\n");
    page += &key_figures(report);
    page += "</header>\n";

    page += "<section>\n<h2>Totals</h2>\n<div class=\"cols\">\n";
    page += &totals_table(&report.totals);
    page += &latency_table(report.latency_ms.as_ref());
    page += "</div>\n</section>\n";

    page += "<section>\n<h2>Over time</h2>\n";
    page += &time_charts(report);
    page += &events_table(&report.events);
    page += "</section>\n";

    page += "<section>\n<h2>Errors and refusals</h2>\n";
    page += &reasons_table(&report.errors_by_reason);
    page += "</section>\n";

    page += "<section>\n<h2>Latency distribution</h2>\n";
    page += &histogram_chart(&report.histogram, report.latency_ms.as_ref());
    page += "</section>\n";

    page += "<section>\n<h2>Groups</h2>\n";
    page += &groups_table(&report.groups);
    page += "</section>\n";

    page += "<section>\n<h2>Sink verification</h2>\n";
    page += &verify_section(report.verify.as_ref());
    page += "</section>\n";

    page += "<section>\n<h2>Scenario</h2>\n";
    if report.scenario_toml.trim().is_empty() {
        page += "<p class=\"nodata\">No data: the report does not echo its scenario file.</p>\n";
    } else {
        page += &format!("<pre>{}</pre>\n", escape(&report.scenario_toml));
    }
    page += "</section>\n";
    page += "<footer>Written by weir-load. Self-contained: no scripts or external resources.</footer>\n";
    page += "</body>\n</html>\n";
    page
}

/// Escapes text for HTML element content and quoted attribute values alike.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out += "&amp;",
            '<' => out += "&lt;",
            '>' => out += "&gt;",
            '"' => out += "&quot;",
            '\'' => out += "&#39;",
            c => out.push(c),
        }
    }
    out
}

/// `1234567` as `1,234,567`.
fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// A measured float with the digits that matter, or `n/a` when it is not a number.
fn decimal(value: f64) -> String {
    if !value.is_finite() {
        return "n/a".to_owned();
    }
    let magnitude = value.abs();
    if magnitude >= 1000.0 {
        let sign = if value < 0.0 { "-" } else { "" };
        format!("{sign}{}", count(magnitude.round() as u64))
    } else if magnitude >= 100.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else if magnitude >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

/// A measured float and its unit, or `n/a` alone.
fn with_unit(value: f64, unit: &str) -> String {
    if value.is_finite() {
        format!("{} {unit}", decimal(value))
    } else {
        "n/a".to_owned()
    }
}

fn ms(value: f64) -> String {
    with_unit(value, "ms")
}

/// An axis label: short, trailing zeros trimmed, `k`/`M` for large values.
fn tick_label(value: f64) -> String {
    let trim = |text: String| {
        if text.contains('.') {
            text.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            text
        }
    };
    let magnitude = value.abs();
    if magnitude >= 1e6 {
        trim(format!("{:.2}", value / 1e6)) + "M"
    } else if magnitude >= 1e4 {
        trim(format!("{:.1}", value / 1e3)) + "k"
    } else {
        trim(format!("{value:.3}"))
    }
}

fn key_figures(report: &RunReport) -> String {
    let totals = &report.totals;
    let mut figures = vec![
        ("throughput", with_unit(totals.msgs_per_sec, "msg/s"), false),
        ("sent", count(totals.sent), false),
        ("acked", count(totals.acked), false),
        ("errors", count(totals.errors), totals.errors > 0),
    ];
    if let Some(latency) = &report.latency_ms {
        figures.push(("p99 latency", ms(latency.p99), false));
    }
    if let Some(verify) = &report.verify {
        let verdict = if verify.passed { "PASSED" } else { "FAILED" };
        figures.push(("sink verification", verdict.to_owned(), !verify.passed));
    }
    let mut html = String::from("<div class=\"figures\">\n");
    for (name, value, bad) in figures {
        let class = if bad { " class=\"bad\"" } else { "" };
        html += &format!("<div class=\"figure\"><span>{name}</span><b{class}>{value}</b></div>\n");
    }
    html + "</div>\n"
}

/// `class` when `condition` holds, else no class.
fn flag(condition: bool, class: &'static str) -> &'static str {
    if condition {
        class
    } else {
        ""
    }
}

/// A two-column table of named values, each value with its CSS class (`bad`, `warn` or none).
fn key_value_table(rows: &[(&str, String, &str)]) -> String {
    let mut html = String::from("<table>\n<tbody>\n");
    for (name, value, class) in rows {
        let class = if class.is_empty() { String::new() } else { format!(" class=\"{class}\"") };
        html += &format!("<tr><th>{name}</th><td{class}>{value}</td></tr>\n");
    }
    html + "</tbody>\n</table>\n"
}

fn totals_table(totals: &RunTotals) -> String {
    let acked = if totals.sent > 0 {
        format!("{} ({:.1}% of sent)", count(totals.acked), totals.acked as f64 * 100.0 / totals.sent as f64)
    } else {
        count(totals.acked)
    };
    key_value_table(&[
        ("Throughput", with_unit(totals.msgs_per_sec, "msg/s"), ""),
        ("Elapsed", with_unit(totals.elapsed_secs, "s"), ""),
        ("Devices", count(totals.devices), ""),
        (
            "Connected at peak",
            count(totals.connected_peak),
            flag(totals.connected_peak < totals.devices, "warn"),
        ),
        ("Sent", count(totals.sent), ""),
        ("Acked", acked, ""),
        ("Errors", count(totals.errors), flag(totals.errors > 0, "bad")),
        ("Refused", count(totals.refused), flag(totals.refused > 0, "bad")),
        ("Reconnects", count(totals.reconnects), ""),
        ("Resent", count(totals.resent), ""),
        ("Data sent", with_unit(totals.bytes_sent as f64 / 1e6, "MB"), ""),
    ])
}

fn latency_table(latency: Option<&LatencySummary>) -> String {
    let Some(latency) = latency else {
        return "<p class=\"nodata\">No latency data: nothing was acknowledged (QoS 0 promises no \
                ack).</p>\n"
            .to_owned();
    };
    let mut html = String::from("<div>\n<h3>Publish &rarr; ack latency, whole run</h3>\n");
    html += &key_value_table(&[
        ("p50", ms(latency.p50), ""),
        ("p99", ms(latency.p99), ""),
        ("p99.9", ms(latency.p999), ""),
        ("max", ms(latency.max), ""),
    ]);
    html + "</div>\n"
}

fn time_charts(report: &RunReport) -> String {
    let timeline = &report.timeline;
    if timeline.is_empty() {
        return "<p class=\"nodata\">No data: the report has no per-second timeline.</p>\n".to_owned();
    }
    let x_max = timeline.iter().map(|p| f64::from(p.t) + 1.0).fold(1.0, f64::max);
    let mid = |t: u32| f64::from(t) + 0.5;
    let markers: Vec<Marker> = report
        .events
        .iter()
        .enumerate()
        .filter(|(_, event)| event.t_secs.is_finite() && (0.0..=x_max).contains(&event.t_secs))
        .map(|(i, event)| Marker { x: event.t_secs, label: (i + 1).to_string(), color: GREY })
        .collect();
    let series = |name: &'static str, color: &'static str, value: fn(&TimelinePoint) -> Option<f64>| Series {
        name,
        color,
        width: 1.8,
        points: timeline.iter().map(|p| (mid(p.t), value(p))).collect(),
    };

    let mut html = String::new();
    html += "<figure>\n<h3>Throughput</h3>\n";
    // acked/s mostly follows sent/s: a thin line over a wide one keeps both visible.
    let mut throughput = vec![Series { width: 3.6, ..series("sent/s", BLUE, |p| Some(p.sent as f64)) }];
    if timeline.iter().any(|p| p.acked > 0) {
        throughput.push(Series { width: 1.6, ..series("acked/s", ORANGE, |p| Some(p.acked as f64)) });
    }
    html += &time_chart(&throughput, x_max, "messages per second", YAxis::Counts, &markers);
    if throughput.len() == 1 {
        html += "<p class=\"note\">Nothing was acknowledged, so only sent/s is drawn.</p>\n";
    }
    html += "</figure>\n";

    html += "<figure>\n<h3>Latency (publish &rarr; ack, per second)</h3>\n";
    let latency = [
        series("p50", BLUE, |p| p.p50_ms),
        series("p99", ORANGE, |p| p.p99_ms),
        Series { width: 1.2, ..series("max", RED, |p| p.max_ms) },
    ];
    if latency.iter().flat_map(|s| &s.points).any(|(_, y)| y.is_some_and(f64::is_finite)) {
        html += &time_chart(&latency, x_max, "latency (ms)", YAxis::Millis, &markers);
    } else {
        html += "<p class=\"nodata\">No latency data: no acks in any second.</p>\n";
    }
    html += "</figure>\n";

    html += "<figure>\n<h3>Connected devices</h3>\n";
    let connected = [series("connected", GREEN, |p| Some(p.connected as f64))];
    html += &time_chart(&connected, x_max, "devices connected", YAxis::Counts, &markers);
    html += "</figure>\n";
    html
}

fn events_table(events: &[EventMark]) -> String {
    if events.is_empty() {
        return "<p class=\"note\">No events: the scenario had no ramp, storm or burst.</p>\n".to_owned();
    }
    let mut html = String::from(
        "<h3>Events (dashed lines on the charts above)</h3>\n<table>\n<thead><tr><th>#</th><th>at</th>\
         <th class=\"text\">event</th><th class=\"text\">detail</th></tr></thead>\n<tbody>\n",
    );
    for (i, event) in events.iter().enumerate() {
        html += &format!(
            "<tr><td>{}</td><td>{} s</td><td class=\"text\">{}</td><td class=\"text\">{}</td></tr>\n",
            i + 1,
            decimal(event.t_secs),
            escape(&event.kind),
            escape(&event.detail)
        );
    }
    html + "</tbody>\n</table>\n"
}

fn reasons_table(reasons: &std::collections::BTreeMap<String, u64>) -> String {
    if reasons.is_empty() {
        return "<p class=\"note\">None: every connection held and every answer was a success.</p>\n"
            .to_owned();
    }
    let mut html = String::from(
        "<table>\n<thead><tr><th>count</th><th class=\"text\">reason</th></tr></thead>\n<tbody>\n",
    );
    for (reason, count) in reasons {
        html += &format!("<tr><td>{count}</td><td class=\"text\">{}</td></tr>\n", escape(reason));
    }
    html + "</tbody>\n</table>\n"
}

fn groups_table(groups: &[GroupTotals]) -> String {
    if groups.is_empty() {
        return "<p class=\"nodata\">No data: the report lists no device groups.</p>\n".to_owned();
    }
    let mut html = String::from(
        "<div class=\"wide\">\n<table>\n<thead><tr><th>group</th><th class=\"text\">protocol</th><th>QoS</th>\
         <th class=\"text\">payload</th><th>devices</th>\
         <th>rate/device</th><th>sent</th><th>acked</th><th>errors</th><th>reconnects</th><th>p50 ms</th>\
         <th>p99 ms</th><th>max ms</th></tr></thead>\n<tbody>\n",
    );
    for group in groups {
        let latency = |pick: fn(&LatencySummary) -> f64| {
            group.latency_ms.as_ref().map_or("n/a".into(), |l| decimal(pick(l)))
        };
        let errors_class = if group.errors > 0 { " class=\"bad\"" } else { "" };
        html += &format!(
            "<tr><td>{}</td><td class=\"text\">{}</td><td>{}</td><td class=\"text\">{}</td><td>{}</td><td>{}/s</td><td>{}</td><td>{}</td>\
             <td{errors_class}>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            escape(&group.name),
            escape(&group.protocol),
            group.qos,
            escape(&group.payload),
            count(group.devices),
            decimal(group.rate_per_device),
            count(group.sent),
            count(group.acked),
            count(group.errors),
            count(group.reconnects),
            latency(|l| l.p50),
            latency(|l| l.p99),
            latency(|l| l.max),
        );
    }
    html + "</tbody>\n</table>\n</div>\n"
}

fn verify_section(verify: Option<&VerifySummary>) -> String {
    let Some(verify) = verify else {
        return "<p class=\"nodata\">No data: the scenario did not ask for the sink to be read back.</p>\n"
            .to_owned();
    };
    let (class, verdict) = if verify.passed { ("pass", "PASSED") } else { ("fail", "FAILED") };
    let mut html = format!("<div class=\"verdict {class}\">{verdict}</div>\n");
    html += &format!("<p class=\"sub\">Read back from {}</p>\n", escape(&verify.sink));
    html += &key_value_table(&[
        ("Devices", count(verify.devices), ""),
        ("Acked by the target", count(verify.acked), ""),
        ("Found in the sink", count(verify.found), ""),
        ("Distinct (device, seq)", count(verify.distinct), ""),
        ("Lost (acked, not found)", count(verify.lost), flag(verify.lost > 0, "bad")),
        ("Duplicates", count(verify.duplicates), flag(verify.duplicates > 0, "warn")),
    ]);
    html
}

fn histogram_chart(buckets: &[HistogramBucket], latency: Option<&LatencySummary>) -> String {
    let buckets: Vec<HistogramBucket> =
        buckets.iter().copied().filter(|b| b.upper_ms.is_finite() && b.upper_ms > 0.0).collect();
    if buckets.iter().all(|b| b.count == 0) {
        return "<p class=\"nodata\">No latency data: the histogram is empty.</p>\n".to_owned();
    }
    let n = buckets.len();
    // Bars sit side by side at x = 0..n; the buckets are log-spaced, so that is a log axis.
    let all_labelled = n <= 16;
    let decade = |ms: f64| (ms.log10() - ms.log10().round()).abs() < 1e-9;
    let x_ticks: Vec<(f64, String)> = buckets
        .iter()
        .enumerate()
        .filter(|(_, b)| all_labelled || decade(b.upper_ms))
        .map(|(i, b)| ((i + 1) as f64, tick_label(b.upper_ms)))
        .collect();
    let counts = buckets.iter().map(|b| b.count as f64);
    let largest = counts.clone().fold(0.0, f64::max);
    let smallest = counts.filter(|&c| c > 0.0).fold(f64::INFINITY, f64::min);
    let (y, y_ticks, y_label) = if largest / smallest > 100.0 {
        // Counts of 1 must still show: the log axis starts below 1.
        let hi = largest.log10().ceil().max(1.0);
        (Scale::Log { lo: -0.3, hi }, log_ticks(0.0, hi), "samples (log scale)")
    } else {
        let (y, ticks) = linear_axis(largest, true);
        (y, ticks, "samples")
    };
    let mut markers = Vec::new();
    if let Some(latency) = latency {
        for (label, value, color) in
            [("p50", latency.p50, BLUE), ("p99", latency.p99, ORANGE), ("max", latency.max, RED)]
        {
            if let Some(x) = bucket_position(&buckets, value) {
                markers.push(Marker { x, label: label.to_owned(), color });
            }
        }
    }
    let plot = Plot {
        x: Scale::Linear { min: 0.0, max: n as f64 },
        y,
        x_ticks,
        y_ticks,
        x_label: "latency, ms (bucket upper bounds; log-spaced buckets)".into(),
        y_label: y_label.into(),
        legend: Vec::new(),
        markers,
    };
    let mut bars = String::new();
    let bar_width = (plot.px(1.0) - plot.px(0.0)).max(1.0);
    let gap = if bar_width > 6.0 { 1.5 } else { 0.0 };
    let bottom = HEIGHT - BOTTOM;
    let mut lower = None;
    for (i, bucket) in buckets.iter().enumerate() {
        let range = match lower {
            Some(lower) => format!("{} to {} ms", tick_label(lower), tick_label(bucket.upper_ms)),
            None => format!("up to {} ms", tick_label(bucket.upper_ms)),
        };
        lower = Some(bucket.upper_ms);
        if bucket.count == 0 {
            continue;
        }
        let top = plot.py(bucket.count as f64).min(bottom - 1.0);
        bars += &format!(
            "<rect x=\"{:.1}\" y=\"{top:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#6b8fc4\">\
             <title>{range}: {} samples</title></rect>\n",
            plot.px(i as f64) + gap / 2.0,
            bar_width - gap,
            bottom - top,
            count(bucket.count)
        );
    }
    let mut html = String::from("<figure>\n<h3>Latency histogram (whole run)</h3>\n");
    html += &plot.render(&bars);
    if latency.is_some() {
        html += "<p class=\"note\">Dashed lines: the whole run's p50, p99 and max.</p>\n";
    }
    html + "</figure>\n"
}

/// Where `ms` falls on the histogram's bar axis, interpolated in log space inside its bucket.
fn bucket_position(buckets: &[HistogramBucket], ms: f64) -> Option<f64> {
    if !ms.is_finite() || ms <= 0.0 {
        return None;
    }
    let i = buckets.iter().position(|b| b.upper_ms >= ms).unwrap_or(buckets.len().checked_sub(1)?);
    let upper = buckets[i].upper_ms;
    let lower = match i {
        0 => match buckets.get(1) {
            Some(next) => upper * upper / next.upper_ms,
            None => upper / 10.0,
        },
        _ => buckets[i - 1].upper_ms,
    };
    let fraction = ((ms / lower).ln() / (upper / lower).ln()).clamp(0.0, 1.0);
    fraction.is_finite().then_some(i as f64 + fraction)
}

// ---- The chart helper: one plot frame (axes, grid, ticks, legend, markers) and its marks. ----

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 290.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 46.0;

#[derive(Clone, Copy, Debug)]
enum Scale {
    Linear {
        min: f64,
        max: f64,
    },
    /// Exponents of ten at the bottom and top of the axis.
    Log {
        lo: f64,
        hi: f64,
    },
}

impl Scale {
    /// Where `value` sits between the axis ends, 0 to 1; off-scale values are pinned to an end.
    fn fraction(self, value: f64) -> f64 {
        let fraction = match self {
            Scale::Linear { min, max } => (value - min) / (max - min),
            Scale::Log { lo, hi } if value > 0.0 => (value.log10() - lo) / (hi - lo),
            Scale::Log { .. } => 0.0,
        };
        if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 1.0)
        }
    }
}

/// A step of 1, 2, 2.5 or 5 times a power of ten giving about `target` intervals over `span`.
fn nice_step(span: f64, target: f64, integer: bool) -> f64 {
    let raw = span / target;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|&step| step >= raw)
        .unwrap_or(10.0 * magnitude);
    if integer {
        step.max(1.0).round()
    } else {
        step
    }
}

/// A linear axis from 0 to a round number at or above `largest`, with its ticks.
fn linear_axis(largest: f64, integer: bool) -> (Scale, Vec<(f64, String)>) {
    let largest = if largest.is_finite() && largest > 0.0 { largest } else { 1.0 };
    let step = nice_step(largest, 5.0, integer);
    let intervals = (largest / step - 1e-9).ceil().max(1.0) as u32;
    let ticks = (0..=intervals).map(|i| (f64::from(i) * step, tick_label(f64::from(i) * step))).collect();
    (Scale::Linear { min: 0.0, max: f64::from(intervals) * step }, ticks)
}

/// Ticks at each power of ten between two exponents, with 2 and 5 between when there are few.
fn log_ticks(lo: f64, hi: f64) -> Vec<(f64, String)> {
    let (first, last) = (lo.ceil() as i32, hi.floor() as i32);
    let fine = last - first <= 3;
    let mut ticks = Vec::new();
    for exponent in first..=last {
        let decade = 10f64.powi(exponent);
        ticks.push((decade, tick_label(decade)));
        if fine && exponent < last {
            ticks.extend([2.0, 5.0].map(|m| (m * decade, tick_label(m * decade))));
        }
    }
    ticks
}

struct Series {
    name: &'static str,
    color: &'static str,
    width: f64,
    /// (x, y); `None` or a non-finite y leaves a gap in the line.
    points: Vec<(f64, Option<f64>)>,
}

/// A dashed vertical line across the plot with a short label at its top.
#[derive(Clone)]
struct Marker {
    x: f64,
    label: String,
    color: &'static str,
}

struct Plot {
    x: Scale,
    y: Scale,
    x_ticks: Vec<(f64, String)>,
    y_ticks: Vec<(f64, String)>,
    x_label: String,
    y_label: String,
    /// (colour, name) of each line, drawn above the plot.
    legend: Vec<(&'static str, &'static str)>,
    markers: Vec<Marker>,
}

impl Plot {
    fn px(&self, x: f64) -> f64 {
        LEFT + self.x.fraction(x) * (WIDTH - LEFT - RIGHT)
    }

    fn py(&self, y: f64) -> f64 {
        HEIGHT - BOTTOM - self.y.fraction(y) * (HEIGHT - TOP - BOTTOM)
    }

    /// The SVG: frame, grid, ticks, axis labels, `marks` (the data), markers, legend.
    fn render(&self, marks: &str) -> String {
        let (plot_top, plot_bottom, plot_right) = (TOP, HEIGHT - BOTTOM, WIDTH - RIGHT);
        let mut svg = format!(
            "<svg viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" aria-label=\"{}\">\n",
            escape(&self.y_label)
        );
        for (value, label) in &self.y_ticks {
            let y = self.py(*value);
            svg += &format!(
                "<line x1=\"{LEFT}\" x2=\"{plot_right}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#e3e3e3\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
                LEFT - 6.0,
                y + 4.0,
                escape(label)
            );
        }
        for (value, label) in &self.x_ticks {
            let x = self.px(*value);
            svg += &format!(
                "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{plot_bottom}\" y2=\"{:.1}\" stroke=\"#444\"/>\
                 <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
                plot_bottom + 5.0,
                plot_bottom + 18.0,
                escape(label)
            );
        }
        svg += &format!(
            "<path d=\"M{LEFT} {plot_top}V{plot_bottom}H{plot_right}\" fill=\"none\" stroke=\"#444\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n\
             <text transform=\"translate(16 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n",
            (LEFT + plot_right) / 2.0,
            HEIGHT - 8.0,
            escape(&self.x_label),
            (plot_top + plot_bottom) / 2.0,
            escape(&self.y_label)
        );
        svg += marks;
        for (i, marker) in self.markers.iter().enumerate() {
            let x = self.px(marker.x);
            // Labels of markers close together step down so they do not overprint.
            let label_y = plot_top + 12.0 + 13.0 * (i % 3) as f64;
            svg += &format!(
                "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{plot_top}\" y2=\"{plot_bottom}\" stroke=\"{c}\" \
                 stroke-width=\"1.2\" stroke-dasharray=\"5 4\"/>\
                 <text x=\"{:.1}\" y=\"{label_y:.1}\" fill=\"{c}\" style=\"fill:{c}\" stroke=\"#fff\" \
                 stroke-width=\"3\" paint-order=\"stroke\" font-weight=\"600\">{}</text>\n",
                x + 3.0,
                escape(&marker.label),
                c = marker.color,
            );
        }
        let mut legend_x = plot_right;
        let y = plot_top - 12.0;
        for (color, name) in self.legend.iter().rev() {
            let text_width = 7.0 * name.chars().count() as f64;
            legend_x -= text_width + 30.0;
            svg += &format!(
                "<line x1=\"{legend_x:.1}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"{color}\" \
                 stroke-width=\"3\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
                legend_x + 18.0,
                legend_x + 22.0,
                y + 4.0,
                escape(name),
            );
        }
        svg + "</svg>\n"
    }
}

/// How a time chart's y axis is drawn.
#[derive(Clone, Copy, PartialEq)]
enum YAxis {
    /// Linear from 0, whole-number ticks.
    Counts,
    /// Milliseconds: logarithmic when the values span more than 100x, so a storm's spike does
    /// not flatten the quiet seconds into the axis; linear from 0 otherwise.
    Millis,
}

/// Smallest positive and largest finite y over the series (infinity and 0 when there are none).
fn series_extent(series: &[Series]) -> (f64, f64) {
    let values = series.iter().flat_map(|s| &s.points).filter_map(|(_, y)| y.filter(|y| y.is_finite()));
    values.fold((f64::INFINITY, 0.0), |(min, max), y| (if y > 0.0 { min.min(y) } else { min }, max.max(y)))
}

/// Lines over `[0, x_max]` seconds, with the events as markers.
fn time_chart(series: &[Series], x_max: f64, y_label: &str, y_axis: YAxis, markers: &[Marker]) -> String {
    let (smallest, largest) = series_extent(series);
    let (y, y_ticks, y_label) =
        if y_axis == YAxis::Millis && smallest.is_finite() && largest / smallest > 100.0 {
            // A line sitting just above a decade would run along the axis: start a decade lower.
            let lo = smallest.log10().floor();
            let lo = if smallest.log10() - lo < 0.2 { lo - 1.0 } else { lo }.max(-3.0);
            let hi = largest.log10().ceil();
            (Scale::Log { lo, hi }, log_ticks(lo, hi), format!("{y_label}, log scale"))
        } else {
            let (y, ticks) = linear_axis(largest, y_axis == YAxis::Counts);
            (y, ticks, y_label.to_owned())
        };
    let x_step = nice_step(x_max, 10.0, true);
    let x_ticks = (0..)
        .map(|i| f64::from(i) * x_step)
        .take_while(|&x| x <= x_max + 1e-9)
        .map(|x| (x, tick_label(x)))
        .collect();
    let plot = Plot {
        x: Scale::Linear { min: 0.0, max: x_max },
        y,
        x_ticks,
        y_ticks,
        x_label: "seconds since start".into(),
        y_label,
        legend: series.iter().map(|s| (s.color, s.name)).collect(),
        markers: markers.to_vec(),
    };
    let mut marks = String::new();
    for line in series {
        let mut segment: Vec<(f64, f64)> = Vec::new();
        let points = line.points.iter().map(|&(x, y)| y.filter(|y| y.is_finite()).map(|y| (x, y)));
        for point in points.chain([None]) {
            match point {
                Some((x, y)) if x.is_finite() => segment.push((plot.px(x), plot.py(y))),
                _ => {
                    marks += &polyline(&segment, line.color, line.width);
                    segment.clear();
                }
            }
        }
    }
    plot.render(&marks)
}

/// One unbroken run of points; a lone point becomes a dot.
fn polyline(points: &[(f64, f64)], color: &str, width: f64) -> String {
    match points {
        [] => String::new(),
        [(x, y)] => format!("<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"2.2\" fill=\"{color}\"/>\n"),
        _ => {
            let coordinates: Vec<String> = points.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            format!(
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"{width}\" \
                 stroke-linejoin=\"round\"/>\n",
                coordinates.join(" ")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run_report::{histogram_buckets, timeline_point};
    use hdrhistogram::Histogram;

    fn point(t: u32, sent: u64, connected: u64, latency_ms: Option<(f64, f64, f64)>) -> TimelinePoint {
        TimelinePoint {
            t,
            sent,
            acked: sent,
            errors: 0,
            connected,
            p50_ms: latency_ms.map(|l| l.0),
            p99_ms: latency_ms.map(|l| l.1),
            max_ms: latency_ms.map(|l| l.2),
        }
    }

    fn three_second_report() -> RunReport {
        RunReport {
            name: "storm".into(),
            label: "weir".into(),
            started_unix_ms: 1_700_000_000_123,
            machine: "2 CPUs, test box, Linux 6.1".into(),
            scenario_toml: "name = \"storm\"\n[[group]]\ndevices = 10\n".into(),
            totals: RunTotals {
                devices: 10,
                connected_peak: 10,
                sent: 30,
                acked: 30,
                elapsed_secs: 3.0,
                msgs_per_sec: 10.0,
                ..RunTotals::default()
            },
            groups: vec![GroupTotals {
                name: "sensors".into(),
                protocol: "mqtt".into(),
                qos: 1,
                payload: "json 128 B".into(),
                devices: 10,
                rate_per_device: 1.0,
                sent: 30,
                acked: 30,
                errors: 0,
                reconnects: 0,
                latency_ms: Some(LatencySummary { p50: 2.0, p99: 5.0, p999: 6.0, max: 7.0 }),
            }],
            latency_ms: Some(LatencySummary { p50: 2.0, p99: 5.0, p999: 6.0, max: 7.0 }),
            histogram: vec![
                HistogramBucket { upper_ms: 1.8, count: 5 },
                HistogramBucket { upper_ms: 3.2, count: 20 },
                HistogramBucket { upper_ms: 5.6, count: 4 },
                HistogramBucket { upper_ms: 10.0, count: 1 },
            ],
            timeline: vec![
                point(0, 10, 10, Some((2.0, 4.0, 5.0))),
                point(1, 10, 10, Some((2.0, 5.0, 7.0))),
                point(2, 10, 10, Some((2.0, 4.0, 6.0))),
            ],
            events: vec![
                EventMark { t_secs: 1.5, kind: "reconnect storm".into(), detail: "4 devices".into() },
                EventMark { t_secs: 2.0, kind: "burst start".into(), detail: "x2".into() },
            ],
            verify: Some(VerifySummary {
                sink: "sqlite /tmp/weir.db".into(),
                passed: true,
                devices: 10,
                acked: 30,
                found: 30,
                distinct: 30,
                lost: 0,
                duplicates: 0,
            }),
            errors_by_reason: [("refused: PUBACK <QuotaExceeded> (0x97)".to_owned(), 3)].into(),
        }
    }

    fn empty_report() -> RunReport {
        RunReport {
            name: "empty".into(),
            label: "weir".into(),
            started_unix_ms: 0,
            machine: String::new(),
            scenario_toml: String::new(),
            totals: RunTotals { elapsed_secs: f64::NAN, msgs_per_sec: f64::INFINITY, ..RunTotals::default() },
            groups: Vec::new(),
            latency_ms: None,
            histogram: Vec::new(),
            timeline: Vec::new(),
            events: Vec::new(),
            verify: None,
            errors_by_reason: Default::default(),
        }
    }

    /// The number of points of every `<polyline>`, in page order.
    fn polyline_lengths(html: &str) -> Vec<usize> {
        html.split("<polyline points=\"")
            .skip(1)
            .map(|rest| rest[..rest.find('"').unwrap()].split_whitespace().count())
            .collect()
    }

    fn assert_no_non_numbers(html: &str) {
        for bad in ["NaN", "inf", "Infinity"] {
            assert!(!html.contains(bad), "{bad} in the page:\n{html}");
        }
    }

    #[test]
    fn a_three_second_timeline_draws_three_point_lines() {
        let html = render(&three_second_report());
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert_eq!(html.matches("<svg").count(), 4, "throughput, latency, connected, histogram");
        // sent/s, acked/s, p50, p99, max, connected: one line each, a point per second.
        assert_eq!(polyline_lengths(&html), [3; 6]);
        assert_eq!(html.matches("<rect").count(), 4, "one bar per non-empty bucket");
        assert!(html.contains("2023-11-14 22:13:20 UTC"), "date from started_unix_ms");
        assert!(html.contains(">PASSED<"));
        assert_no_non_numbers(&html);
    }

    #[test]
    fn gaps_in_latency_break_the_line() {
        let mut report = three_second_report();
        report.timeline.push(point(3, 10, 10, None));
        report.timeline.push(point(4, 10, 10, Some((2.0, 4.0, 5.0))));
        report.timeline.push(point(5, 10, 10, Some((2.0, 4.0, f64::NAN))));
        let html = render(&report);
        // sent/s and acked/s are whole; p50 and p99 break at t=3; max also at the NaN.
        assert_eq!(polyline_lengths(&html), [6, 6, 3, 2, 3, 2, 3, 6]);
        assert_eq!(html.matches("<circle").count(), 1, "max at t=4 stands alone");
        assert_no_non_numbers(&html);
    }

    #[test]
    fn events_are_dashed_markers_on_each_time_chart_and_listed() {
        let html = render(&three_second_report());
        // Two events on three time charts, plus p50/p99/max on the histogram.
        assert_eq!(html.matches("stroke-dasharray").count(), 2 * 3 + 3);
        // t = 1.5 s of 3 s: halfway across the plot.
        let halfway = LEFT + (WIDTH - LEFT - RIGHT) / 2.0;
        let marker = format!(
            "x1=\"{halfway:.1}\" x2=\"{halfway:.1}\" y1=\"{TOP}\" y2=\"{}\" stroke=\"{GREY}\"",
            HEIGHT - BOTTOM
        );
        assert_eq!(html.matches(&marker).count(), 3, "{marker}");
        assert!(html.contains("<td class=\"text\">reconnect storm</td><td class=\"text\">4 devices</td>"));
        assert!(html.contains("<td>2</td><td>2.00 s</td><td class=\"text\">burst start</td>"));
    }

    #[test]
    fn errors_are_listed_by_reason_escaped() {
        let html = render(&three_second_report());
        assert!(
            html.contains("<td>3</td><td class=\"text\">refused: PUBACK &lt;QuotaExceeded&gt; (0x97)</td>"),
            "{html}"
        );
        assert!(render(&empty_report()).contains("None: every connection held"));
    }

    #[test]
    fn every_report_string_is_escaped() {
        let mut report = three_second_report();
        report.label = "<script>alert('x')</script>".into();
        report.name = "a & \"b\"".into();
        report.machine = "<img src=x>".into();
        report.scenario_toml = "payload = \"</pre><b>\"".into();
        report.events[0].kind = "<i>storm</i>".into();
        report.groups[0].name = "<g>".into();
        report.verify.as_mut().unwrap().sink = "<sink>".into();
        let html = render(&report);
        assert!(!html.contains("<script"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"));
        assert!(html.contains("a &amp; &quot;b&quot;"));
        for raw in ["<img", "</pre><b>", "<i>", "<g>", "<sink>"] {
            assert!(!html.contains(raw), "{raw} unescaped");
        }
        assert!(html.contains("payload = &quot;&lt;/pre&gt;&lt;b&gt;&quot;"));
    }

    #[test]
    fn an_empty_report_says_no_data_instead_of_drawing() {
        let html = render(&empty_report());
        assert!(!html.contains("<svg"), "{html}");
        assert!(html.contains("no per-second timeline"));
        assert!(html.contains("No latency data: nothing was acknowledged"));
        assert!(html.contains("the histogram is empty"));
        assert!(html.contains("did not ask for the sink to be read back"));
        assert!(!html.contains("PASSED") && !html.contains("FAILED"));
        assert!(html.contains("<b>n/a</b>") && !html.contains("n/a msg/s"), "no unit after n/a");
        assert!(html.contains("does not echo its scenario file"));
        assert_no_non_numbers(&html);
    }

    #[test]
    fn non_numbers_in_the_data_never_reach_the_svg() {
        let mut report = three_second_report();
        report.timeline[1] = point(1, 10, 10, Some((f64::NAN, f64::INFINITY, f64::NEG_INFINITY)));
        report.events.push(EventMark { t_secs: f64::NAN, kind: "odd".into(), detail: String::new() });
        report.histogram.push(HistogramBucket { upper_ms: f64::INFINITY, count: 3 });
        report.latency_ms = Some(LatencySummary { p50: f64::NAN, p99: 5.0, p999: 6.0, max: f64::INFINITY });
        report.totals.elapsed_secs = f64::NAN;
        let html = render(&report);
        assert_no_non_numbers(&html);
        let no_latency =
            RunReport { timeline: vec![point(0, 5, 1, None), point(1, 0, 0, None)], ..three_second_report() };
        assert!(render(&no_latency).contains("No latency data: no acks in any second."));
    }

    #[test]
    fn the_page_references_nothing_outside_itself() {
        let html = render(&three_second_report());
        for external in ["http://", "https://", "src=", "href=", "url(", "@import", "<script", "<link"] {
            assert!(!html.contains(external), "{external} in the page");
        }
    }

    #[test]
    fn latency_spanning_over_100x_gets_a_log_axis() {
        let mut report = three_second_report();
        let html = render(&report);
        assert!(html.contains(">latency (ms)</text>"), "4..7 ms is linear");
        report.timeline[1] = point(1, 10, 10, Some((2.0, 150.0, 900.0)));
        let html = render(&report);
        assert!(html.contains(">latency (ms), log scale</text>"));
        // Decades 1..1000 ms labelled on the y axis.
        for decade in ["1", "10", "100", "1000"] {
            assert!(html.contains(&format!("text-anchor=\"end\">{decade}</text>")), "{decade}");
        }
    }

    #[test]
    fn axes_get_round_ticks() {
        let (scale, ticks) = linear_axis(937.0, true);
        assert!(matches!(scale, Scale::Linear { min: 0.0, max: 1000.0 }), "{scale:?}");
        let labels: Vec<&str> = ticks.iter().map(|(_, label)| label.as_str()).collect();
        assert_eq!(labels, ["0", "200", "400", "600", "800", "1000"]);
        let (_, ticks) = linear_axis(3.0, true);
        assert!(ticks.iter().all(|(value, _)| value.fract() == 0.0), "no half devices: {ticks:?}");
        let (_, ticks) = linear_axis(0.0, false);
        assert_eq!(ticks.last().unwrap().0, 1.0);
        assert_eq!(nice_step(60.0, 10.0, true), 10.0);
        assert_eq!(nice_step(140.0, 10.0, true), 20.0);
        assert_eq!(nice_step(0.9, 5.0, false), 0.2);
        assert_eq!(tick_label(25_000.0), "25k");
        assert_eq!(tick_label(1_500_000.0), "1.5M");
        assert_eq!(tick_label(0.018), "0.018");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(count(999), "999");
        assert_eq!(decimal(12_345.6), "12,346");
    }

    #[test]
    fn percentiles_sit_inside_their_histogram_bucket() {
        let buckets = three_second_report().histogram;
        assert_eq!(bucket_position(&buckets, 1.8), Some(1.0));
        let p50 = bucket_position(&buckets, 2.0).unwrap();
        assert!(p50 > 1.0 && p50 < 2.0, "{p50}");
        assert_eq!(bucket_position(&buckets, 50.0), Some(4.0), "beyond the last bucket: its end");
        assert_eq!(bucket_position(&buckets, f64::NAN), None);
        assert_eq!(bucket_position(&[], 1.0), None);
    }

    /// Writes a realistic report to /tmp/weir-report.html for a look in a browser: 60 s, 2000
    /// devices ramping up over 10 s, a reconnect storm at 30 s with a latency spike, a burst at
    /// 45-50 s, one sink verification with duplicates; and an empty one to
    /// /tmp/weir-report-empty.html.
    #[test]
    #[ignore = "writes a sample report for a visual check"]
    fn write_sample_report() {
        // A small deterministic generator: a few acks per second are slow, a storm makes many slow.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut random = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut whole = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        let mut timeline = Vec::new();
        let mut sent_total = 0;
        for t in 0..60u32 {
            let connected = match t {
                0..=9 => 200 * (t as u64 + 1),
                30 => 1_150,
                31..=35 => 1_150 + 170 * (t as u64 - 30),
                _ => 2_000,
            };
            let rate = if (45..50).contains(&t) { 20 } else { 10 };
            let sent = connected * rate;
            let storm = (30..34).contains(&t);
            let mut second = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            for _ in 0..sent.min(4_000) {
                let base = 600.0 + 900.0 * random();
                let tail = if random() < if storm { 0.3 } else { 0.01 } {
                    (if storm { 40_000.0 } else { 6_000.0 }) * random().powi(2)
                } else {
                    0.0
                };
                let slow = if storm && random() < 0.01 { 2_000_000.0 * random() } else { 0.0 };
                let micros = (base + tail + slow) as u64;
                second.record(micros).unwrap();
                whole.record(micros).unwrap();
            }
            sent_total += sent;
            let errors = if t == 30 { 850 } else { 0 };
            timeline.push(timeline_point(t, sent, sent - errors.min(sent), errors, connected, &second));
        }
        let acked = timeline.iter().map(|p| p.acked).sum();
        let report = RunReport {
            name: "reconnect-storm".into(),
            label: "weir".into(),
            started_unix_ms: 1_718_000_000_000,
            machine: "2 CPUs, Intel(R) Xeon(R) CPU @ 2.20GHz, Linux 6.1.0-18-amd64".into(),
            scenario_toml:
                "name = \"reconnect-storm\"\nduration_secs = 60\n\n[[group]]\nname = \"sensors\"\n\
                            devices = 2000\nrate_per_device = 10\nqos = 1\npayload = { kind = \"json\", \
                            bytes = 128 }\nramp_up_secs = 10\n\n[[storm]]\nat_secs = 30\nfraction = 0.42\n\n\
                            [[burst]]\nat_secs = 45\nsecs = 5\nfactor = 2\n"
                    .into(),
            totals: RunTotals {
                devices: 2_000,
                connected_peak: 2_000,
                sent: sent_total,
                acked,
                errors: 850,
                refused: 0,
                reconnects: 850,
                resent: 212,
                bytes_sent: sent_total * 170,
                elapsed_secs: 60.4,
                msgs_per_sec: acked as f64 / 60.4,
            },
            groups: vec![
                GroupTotals {
                    name: "sensors".into(),
                    protocol: "mqtt".into(),
                    qos: 1,
                    payload: "json 128 B".into(),
                    devices: 1_500,
                    rate_per_device: 10.0,
                    sent: sent_total * 3 / 4,
                    acked: acked * 3 / 4,
                    errors: 850,
                    reconnects: 850,
                    latency_ms: LatencySummary::from_micros(&whole),
                },
                GroupTotals {
                    name: "gateways-ws".into(),
                    protocol: "ws".into(),
                    qos: 1,
                    payload: "protobuf 64 B".into(),
                    devices: 500,
                    rate_per_device: 10.0,
                    sent: sent_total / 4,
                    acked: acked / 4,
                    errors: 0,
                    reconnects: 0,
                    latency_ms: LatencySummary::from_micros(&whole),
                },
            ],
            latency_ms: LatencySummary::from_micros(&whole),
            histogram: histogram_buckets(&whole),
            timeline,
            events: vec![
                EventMark { t_secs: 10.0, kind: "ramp-up done".into(), detail: "2000 devices".into() },
                EventMark {
                    t_secs: 30.0,
                    kind: "reconnect storm".into(),
                    detail: "850 devices dropped and reconnected".into(),
                },
                EventMark { t_secs: 45.0, kind: "burst start".into(), detail: "sensors x2".into() },
                EventMark { t_secs: 50.0, kind: "burst end".into(), detail: String::new() },
            ],
            verify: Some(VerifySummary {
                sink: "sqlite /tmp/weir-load/storm.db".into(),
                passed: true,
                devices: 2_000,
                acked,
                found: acked + 212,
                distinct: acked,
                lost: 0,
                duplicates: 212,
            }),
            errors_by_reason: [("connection broke mid-run: reset by peer".to_owned(), 850)].into(),
        };
        std::fs::write("/tmp/weir-report.html", render(&report)).unwrap();
        std::fs::write("/tmp/weir-report.json", serde_json::to_vec_pretty(&report).unwrap()).unwrap();
        std::fs::write("/tmp/weir-report-empty.html", render(&empty_report())).unwrap();
    }
}
