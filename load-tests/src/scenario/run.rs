//! Runs a [`Scenario`]: spawns every device, plays the events, ticks once a second (a live
//! progress line on stderr and a point of the timeline), waits for the devices to finish, reads
//! the sink back when asked, and assembles the [`RunReport`].

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use hdrhistogram::Histogram;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{interval_at, sleep_until, Duration, Instant, MissedTickBehavior};

use super::sim::{self, GroupPlan, Shared};
use super::stats::{Counters, Stats};
use super::{EventKind, Scenario, Verify};
use crate::cpu::{micros_per_message, process_cpu_time, CpuMeter};
use crate::device::new_latency_histogram;
use crate::report::{DeviceCounts, FloodReport, LatencySummary, Scenario as FloodScenario};
use crate::run_report::{
    histogram_buckets, timeline_point, EventMark, GroupTotals, RunReport, RunTotals, TimelinePoint,
    VerifySummary,
};
use crate::verify;

/// File descriptors the generator needs besides its connections.
const SPARE_FDS: u64 = 64;

/// How a run is labelled and reported.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// The target's name in the report (e.g. `weir`, `mosquitto`).
    pub label: String,
    /// The scenario file's text, echoed in the report.
    pub scenario_text: String,
    /// No progress line on stderr.
    pub quiet: bool,
    /// A server process whose CPU time is read at the start and at the end of the run.
    pub cpu_pid: Option<u32>,
}

/// What a run produced.
#[derive(Debug)]
pub struct RunOutcome {
    pub report: RunReport,
    /// Every device's sent and acknowledged-through seqs, for a verifier.
    pub devices: DeviceCounts,
    /// Errors and refusals by reason.
    pub errors_by_reason: std::collections::BTreeMap<String, u64>,
    /// CPU time `cpu_pid` used from the start until every device finished.
    pub target_cpu: Option<Duration>,
    /// Messages answered (or, for groups that are not answered, written).
    pub completed: u64,
}

impl RunOutcome {
    /// The run in `weir-load flood`'s one-line shape, so `weir-load compare` can put two runs side
    /// by side. The scenario fields are the first group's.
    pub fn flood_report(&self, scenario: &Scenario) -> FloodReport {
        let first = &scenario.devices[0];
        let totals = &self.report.totals;
        FloodReport {
            label: self.report.label.clone(),
            host_cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            scenario: FloodScenario {
                connections: scenario.device_count(),
                qos: first.qos,
                payload_bytes: first.payload_bytes,
                duration_secs: scenario.duration_s.ceil() as u64,
            },
            sent: totals.sent,
            acked: totals.acked,
            errors: totals.errors,
            elapsed_secs: totals.elapsed_secs,
            msgs_per_sec: totals.msgs_per_sec,
            ack_latency_ms: self.report.latency_ms,
            first_seq: 1,
            last_seq_per_device_max: self.devices.values().map(|d| d.sent).max().unwrap_or(0),
            reconnects: totals.reconnects,
            resent: totals.resent,
            targets: Vec::new(),
            target_cpu_secs: self.target_cpu.map(|cpu| (cpu.as_secs_f64() * 1000.0).round() / 1000.0),
            cpu_us_per_msg: self
                .target_cpu
                .and_then(|cpu| micros_per_message(cpu, self.completed))
                .map(|us| (us * 1000.0).round() / 1000.0),
            devices: self.devices.clone(),
        }
    }
}

/// Runs the scenario to the end (or until Ctrl-C ends publishing early).
pub async fn run(scenario: &Scenario, options: &RunOptions) -> anyhow::Result<RunOutcome> {
    let devices = scenario.device_count();
    crate::fd_limit::ensure_fd_limit(devices as u64 + SPARE_FDS, "one per device and some spare")?;
    let groups: Vec<Arc<GroupPlan>> = scenario
        .devices
        .iter()
        .enumerate()
        .map(|(index, config)| {
            let addr = scenario.target.addr(config.protocol).expect("checked when parsed");
            Arc::new(GroupPlan::new(index, config.clone(), addr))
        })
        .collect();

    if let Some(pid) = options.cpu_pid {
        process_cpu_time(pid).context("--cpu-pid")?;
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    // Spawning tens of thousands of tasks takes a moment: the clock starts after.
    let start = Instant::now() + Duration::from_millis(200);
    let publish_for = Duration::from_secs_f64(scenario.duration_s);
    let shared = Arc::new(Shared {
        start,
        start_unix_ms: sim::unix_ms_now() + 200,
        drain_deadline: start + publish_for + Duration::from_secs_f64(scenario.drain_timeout_s),
        source_addrs: scenario.target.source_addrs.clone(),
        connect_permits: Semaphore::new(scenario.target.connect_concurrency),
        stats: Stats::new(groups.len()),
        stop: stop_rx,
    });

    let mut tasks = JoinSet::new();
    let mut global = 0;
    for group in &groups {
        for index in 0..group.config.count {
            let (shared, group) = (Arc::clone(&shared), Arc::clone(group));
            tasks.spawn(async move {
                let id = group.device_id(index);
                (id, sim::run_device(shared, group, index, global).await)
            });
            global += 1;
        }
    }
    if !options.quiet {
        eprintln!(
            "run {}: {devices} devices in {} groups against {}, {} s",
            scenario.name,
            groups.len(),
            options.label,
            scenario.duration_s
        );
    }

    let events = tokio::spawn(play_events(scenario.clone(), groups.clone(), start));
    let stopper = tokio::spawn(async move {
        tokio::select! {
            _ = sleep_until(start + publish_for) => {}
            _ = tokio::signal::ctrl_c() => eprintln!("run: Ctrl-C: publishing stops, waiting for the last answers"),
        }
        let _ = stop_tx.send(true);
    });

    sleep_until(start).await;
    // The server's CPU time counts from the start; connections made during a ramp-up are in it.
    let cpu_meter = options.cpu_pid.map(CpuMeter::start).transpose().context("--cpu-pid")?;
    let mut ticker = Ticker::new(start);
    let mut tick = interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut counts = DeviceCounts::new();
    while !tasks.is_empty() {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(Ok((id, count))) => { counts.insert(id, count); }
                Some(Err(error)) => anyhow::bail!("a device task failed: {error}"),
                None => {}
            },
            _ = tick.tick() => ticker.tick(&shared, devices, options.quiet),
        }
    }
    stopper.abort();
    let target_cpu = cpu_meter.map(|meter| meter.elapsed()).transpose().context("--cpu-pid")?;
    let mut marks = events.await.unwrap_or_default();
    ticker.tick(&shared, devices, options.quiet);
    marks.sort_by(|a, b| a.t_secs.total_cmp(&b.t_secs));

    let verify = match &scenario.verify {
        Some(target) => Some(verify_sink(target, &counts).await?),
        None => None,
    };
    let completed = completed(&shared.stats, &groups);
    let report = assemble(scenario, options, &shared, &groups, ticker, marks, verify);
    Ok(RunOutcome {
        report,
        devices: counts,
        errors_by_reason: shared.stats.errors_by_reason(),
        target_cpu,
        completed,
    })
}

/// Applies the events at their moments; returns the marks for the report (and the end of the
/// longest ramp-up).
async fn play_events(scenario: Scenario, groups: Vec<Arc<GroupPlan>>, start: Instant) -> Vec<EventMark> {
    let mut marks = Vec::new();
    let ramp = scenario.devices.iter().map(|g| g.ramp_up_s).fold(0.0, f64::max);
    if ramp > 0.0 {
        marks.push(EventMark {
            t_secs: ramp,
            kind: "ramp-up done".into(),
            detail: "every device has started".into(),
        });
    }
    // A burst's end is an action of its own on the timeline.
    let mut actions: Vec<(f64, usize, bool)> = Vec::new();
    for (i, event) in scenario.events.iter().enumerate() {
        actions.push((event.at_s, i, false));
        if event.kind == EventKind::Burst {
            let end = event.at_s + event.duration_s.unwrap_or(0.0);
            if end < scenario.duration_s {
                actions.push((end, i, true));
            }
        }
    }
    actions.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (at, i, is_end) in actions {
        sleep_until(start + Duration::from_secs_f64(at)).await;
        let event = &scenario.events[i];
        let hit: Vec<&Arc<GroupPlan>> = groups
            .iter()
            .filter(|g| event.group.as_ref().is_none_or(|name| &g.config.name == name))
            .collect();
        let names = event.group.clone().unwrap_or_else(|| "every group".into());
        match (event.kind, is_end) {
            (EventKind::ReconnectStorm, _) => {
                let fraction = event.fraction.unwrap_or(1.0);
                for group in &hit {
                    group.storm.send_modify(|(generation, share)| {
                        *generation += 1;
                        *share = fraction;
                    });
                }
                marks.push(EventMark {
                    t_secs: at,
                    kind: "reconnect storm".into(),
                    detail: format!("{:.0}% of {names} drop their connections", fraction * 100.0),
                });
            }
            (EventKind::Burst, false) => {
                let factor = event.factor.unwrap_or(1.0);
                for group in &hit {
                    group.set_burst_factor(factor);
                }
                marks.push(EventMark {
                    t_secs: at,
                    kind: "burst start".into(),
                    detail: format!("{names} at {factor}x rate for {} s", event.duration_s.unwrap_or(0.0)),
                });
            }
            (EventKind::Burst, true) => {
                for group in &hit {
                    group.set_burst_factor(1.0);
                }
                marks.push(EventMark {
                    t_secs: at,
                    kind: "burst end".into(),
                    detail: format!("{names} back to its rate"),
                });
            }
        }
    }
    marks
}

/// The once-a-second snapshot: the timeline and the whole run's latency histogram.
struct Ticker {
    start: Instant,
    last: [u64; 3],
    timeline: Vec<TimelinePoint>,
    latency: Histogram<u64>,
}

impl Ticker {
    fn new(start: Instant) -> Self {
        Self { start, last: [0; 3], timeline: Vec::new(), latency: new_latency_histogram() }
    }

    fn tick(&mut self, shared: &Shared, devices: usize, quiet: bool) {
        let total = &shared.stats.total;
        let now = [Counters::get(&total.sent), Counters::get(&total.acked), Counters::get(&total.errors)];
        let delta = [now[0] - self.last[0], now[1] - self.last[1], now[2] - self.last[2]];
        self.last = now;
        let second = shared.stats.take_second();
        let _ = self.latency.add(&second);
        let t = self.timeline.len() as u32;
        let connected = Counters::get(&total.connected);
        let point = timeline_point(t, delta[0], delta[1], delta[2], connected, &second);
        if !quiet {
            let p99 = point.p99_ms.map_or_else(|| "-".to_owned(), |p| format!("{p:.1} ms"));
            eprintln!(
                "[{:>4}s] connected {connected}/{devices}  sent {}/s  acked {}/s  p99 {p99}  errors {} (total sent {}, acked {})",
                Instant::now().saturating_duration_since(self.start).as_secs(),
                delta[0],
                delta[1],
                now[2],
                now[0],
                now[1],
            );
        }
        self.timeline.push(point);
    }
}

async fn verify_sink(target: &Verify, counts: &DeviceCounts) -> anyhow::Result<VerifySummary> {
    let (sink, found) = match target {
        Verify::Sqlite { db, table } => {
            let (path, name) = (db.clone(), table.clone());
            let found = tokio::task::spawn_blocking(move || verify::sqlite::read(&path, &name))
                .await
                .context("the SQLite reader thread panicked")??;
            (format!("sqlite {} table {table}", db.display()), found)
        }
        Verify::Postgres { url, table } => {
            let ids: Vec<String> = counts.keys().cloned().collect();
            (format!("postgres table {table}"), verify::postgres::consume(url, table, Some(&ids)).await?)
        }
        Verify::Kafka { brokers, topic, idle_timeout_s } => {
            let found = verify::kafka::consume(brokers, topic, Duration::from_secs(*idle_timeout_s))
                .await
                .with_context(|| format!("reading topic {topic}"))?;
            (format!("kafka {brokers} topic {topic}"), found)
        }
    };
    let verdict = verify::verdict(counts, &found);
    let totals = &verdict.totals;
    Ok(VerifySummary {
        sink,
        passed: verdict.passed(),
        devices: totals.devices,
        acked: totals.acked,
        found: totals.found,
        distinct: totals.distinct,
        lost: totals.lost,
        duplicates: totals.duplicates,
    })
}

fn assemble(
    scenario: &Scenario,
    options: &RunOptions,
    shared: &Shared,
    groups: &[Arc<GroupPlan>],
    ticker: Ticker,
    events: Vec<EventMark>,
    verify: Option<VerifySummary>,
) -> RunReport {
    let completed = completed(&shared.stats, groups);
    let stats = &shared.stats;
    let total = &stats.total;
    let get = Counters::get;
    let elapsed_secs = stats.last_progress_secs();
    let group_totals = groups
        .iter()
        .map(|g| {
            let c = &stats.groups[g.index].counters;
            let config = &g.config;
            let payload = match config.payload {
                super::PayloadFormat::Json => "json",
                super::PayloadFormat::Protobuf => "protobuf",
            };
            GroupTotals {
                name: config.name.clone(),
                protocol: config.protocol.name().to_owned(),
                qos: config.qos,
                payload: format!("{payload} {} B", config.payload_bytes),
                devices: config.count as u64,
                rate_per_device: config.rate,
                sent: get(&c.sent),
                acked: get(&c.acked),
                errors: get(&c.errors),
                reconnects: get(&c.reconnects),
                latency_ms: LatencySummary::from_micros(&stats.groups[g.index].latency()),
            }
        })
        .collect();
    let machine = crate::idle::Machine::read();
    RunReport {
        name: scenario.name.clone(),
        label: options.label.clone(),
        started_unix_ms: shared.start_unix_ms,
        machine: format!(
            "{} CPUs ({}), {} GiB, Linux {}",
            machine.cores,
            machine.cpu_model,
            machine.mem_total_bytes.map_or(0, |b| b >> 30),
            machine.kernel
        ),
        scenario_toml: options.scenario_text.clone(),
        totals: RunTotals {
            devices: scenario.device_count() as u64,
            connected_peak: stats.connected_peak(),
            sent: get(&total.sent),
            acked: get(&total.acked),
            errors: get(&total.errors),
            refused: get(&total.refused),
            reconnects: get(&total.reconnects),
            resent: get(&total.resent),
            bytes_sent: get(&total.bytes_sent),
            elapsed_secs,
            msgs_per_sec: if elapsed_secs > 0.0 { completed as f64 / elapsed_secs } else { 0.0 },
        },
        groups: group_totals,
        latency_ms: LatencySummary::from_micros(&ticker.latency),
        histogram: histogram_buckets(&ticker.latency),
        timeline: ticker.timeline,
        events,
        verify,
        errors_by_reason: stats.errors_by_reason(),
    }
}

/// Messages through: answered ones for groups whose messages are answered, written ones for
/// the others (MQTT QoS 0).
fn completed(stats: &Stats, groups: &[Arc<GroupPlan>]) -> u64 {
    groups
        .iter()
        .map(|g| {
            let c = &stats.groups[g.index].counters;
            Counters::get(if g.config.acked() { &c.acked } else { &c.sent })
        })
        .sum()
}

/// Where `--json`/`--html` go by default: the current directory.
pub fn default_report_path(name: &str, extension: &str) -> PathBuf {
    let safe: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    PathBuf::from(format!("weir-load-{safe}.{extension}"))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use bytes::BytesMut;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use weir_protocols::mqtt::{self, Packet};

    use super::*;

    /// A minimal MQTT 3.1.1 server: CONNACK, then counts PUBLISH packets until DISCONNECT.
    async fn counting_server() -> (std::net::SocketAddr, Arc<AtomicU64>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let publishes = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&publishes);
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let counted = Arc::clone(&counted);
                tokio::spawn(async move {
                    let mut buf = BytesMut::new();
                    loop {
                        while let Some(packet) = mqtt::decode(&mut buf, 1 << 20).unwrap() {
                            match packet {
                                Packet::Connect(_) => stream.write_all(&[0x20, 2, 0, 0]).await.unwrap(),
                                Packet::Publish(_) => {
                                    counted.fetch_add(1, Ordering::SeqCst);
                                }
                                Packet::Disconnect => return,
                                other => panic!("unexpected {other:?}"),
                            }
                        }
                        if stream.read_buf(&mut buf).await.unwrap() == 0 {
                            return;
                        }
                    }
                });
            }
        });
        (addr, publishes)
    }

    #[tokio::test]
    async fn flat_out_qos0_devices_stop_on_time_and_count_what_the_server_read() {
        let (addr, publishes) = counting_server().await;
        let text = format!(
            "name = \"q0\"\nduration_s = 0.5\ndrain_timeout_s = 5\n[target]\nmqtt = \"{addr}\"\n\
             [[devices]]\nname = \"d\"\ncount = 4\nprotocol = \"mqtt3\"\nqos = 0\nrate = 0\n"
        );
        let scenario = Scenario::parse(&text).unwrap();
        let options = RunOptions { quiet: true, ..RunOptions::default() };
        // A device that never looks at the clock while it can write would write forever.
        let outcome = tokio::time::timeout(Duration::from_secs(60), run(&scenario, &options))
            .await
            .expect("the run ends after its duration and drain")
            .unwrap();
        assert!(outcome.errors_by_reason.is_empty(), "{:?}", outcome.errors_by_reason);
        let totals = &outcome.report.totals;
        assert!(totals.sent > 0);
        assert_eq!(totals.acked, 0);
        // Each device waits for the server's close after its DISCONNECT: every publish counted
        // as sent was read.
        assert_eq!(publishes.load(Ordering::SeqCst), totals.sent);
        assert_eq!(outcome.devices.values().map(|d| d.sent).sum::<u64>(), totals.sent);
        assert!(outcome.devices.values().all(|d| d.acked_through == 0));
    }
}
