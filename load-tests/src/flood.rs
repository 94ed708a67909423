//! `weir-load flood`: N simulated devices publish telemetry as fast as allowed for a fixed time,
//! to one server or spread over several (`--targets`), and report totals, ack latency, what
//! every device sent and had acknowledged, and connections per server.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use rumqttc::QoS;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::cpu::{micros_per_message, process_cpu_time, CpuMeter};
use crate::device::{
    new_latency_histogram, run_device, DeviceError, DeviceOutcome, DevicePlan, DeviceProgress, DeviceWiring,
    RunStart,
};
use crate::fd_limit::ensure_fd_limit;
use crate::outbox::run_outbox_device;
use crate::payload::TelemetryPayload;
use crate::report::{DeviceCount, DeviceCounts, FloodReport, LatencySummary, Scenario};
use crate::targets::{Target, TargetBook, TargetCount};

/// File descriptors the generator needs besides its connections (stdio, epoll, /proc reads).
const SPARE_FDS: u64 = 64;

/// What to flood and how: the options of `weir-load flood`. [`FloodParams::default`] gives the
/// CLI defaults (127.0.0.1:1883, 100 connections, QoS 1, 128-byte payloads, 10 s).
#[derive(Debug, Clone, clap::Args)]
pub struct FloodParams {
    /// MQTT server to load (one target; see `--targets` for several).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// Several MQTT servers, `host:port,host:port,...`, instead of `--host`/`--port`: devices
    /// are assigned round-robin, and a device whose connect or reconnect fails moves on to the
    /// next server in the list (as behind DNS or a load balancer). The report counts
    /// connections, reconnects and failures per server.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["host", "port"])]
    pub targets: Vec<Target>,
    /// Simulated devices, one MQTT connection each.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub connections: u32,
    /// 0: fire and forget, throughput counts writes; 1: throughput counts PUBACKs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    /// Size of each JSON payload (padded with a `pad` metric).
    #[arg(long, default_value_t = 128)]
    pub payload_bytes: usize,
    /// Publishing time; outstanding acks are awaited after it.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Messages per second per connection; 0 = as fast as possible. Paced devices are spread
    /// over the period (each its own phase), so the server sees a steady stream of
    /// `connections x rate` messages per second, not one burst per period.
    #[arg(long, default_value_t = 0)]
    pub rate_per_conn: u32,
    /// QoS 1 publishes awaiting PUBACK per connection; publishing waits when it is reached.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_inflight: u16,
    /// Client ids are `{prefix}-{i}`; default `load-{unix time}` so reruns against a persistent
    /// sink are not deduplicated away. Letters, digits, `-`, `_` and `.` only.
    #[arg(long)]
    pub client_prefix: Option<String>,
    /// Name of the target in the report.
    #[arg(long, default_value = "weir")]
    pub label: String,
    /// Deadline for TCP connect plus CONNACK, per connection.
    #[arg(long, default_value_t = 10)]
    pub connect_timeout_secs: u64,
    /// How long to wait after the deadline for outstanding PUBACKs before giving up on them.
    #[arg(long, default_value_t = 10)]
    pub drain_timeout_secs: u64,
    /// TCP_NODELAY on each device socket. On (default): every publish is its own TCP segment,
    /// as from a real fleet where each device sends one reading at a time, and both weir and the
    /// Mosquitto baseline set it on their side too. Off lets the kernel coalesce back-to-back
    /// publishes (rumqttc's own default): the generator needs ~40% less CPU per message,
    /// but servers see artificial batches (it speeds weir up and slows Mosquitto down), and
    /// paced QoS 1 latencies include Nagle's wait for the previous ack.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub tcp_nodelay: bool,
    /// Devices with an outbox (QoS 1 only): a connection that drops is not an error; the device
    /// reconnects with backoff (100 ms doubling to 2 s, with jitter; to the same server first,
    /// to the next of `--targets` once that fails), resends every publish not yet acknowledged
    /// with its seq, and carries on. For runs where the server crashes or
    /// restarts; reconnects and resends are counted in the report.
    #[arg(long)]
    pub reconnect: bool,
    /// Connections being opened (TCP connect plus CONNECT/CONNACK) at once; the next device
    /// starts connecting when one of them has connected or failed. 0: every device at once.
    /// Thousands of simultaneous connects overflow a server's listen backlog (Mosquitto's is
    /// 100) and the kernel's SYN queue; the retransmitted SYNs then take seconds, or miss the
    /// connect timeout.
    #[arg(long, default_value_t = 0)]
    pub connect_concurrency: u32,
    /// Process id of the server under load: its CPU time (user + system, `/proc/PID/stat`)
    /// from the common start to the end of the run goes into the report as `target_cpu_secs`
    /// and `cpu_us_per_msg`. The server must run on this machine.
    #[arg(long)]
    pub cpu_pid: Option<u32>,
}

impl Default for FloodParams {
    /// The CLI defaults, taken from the clap attributes so there is one copy of them.
    fn default() -> Self {
        use clap::{Args, FromArgMatches};
        let matches = Self::augment_args(clap::Command::new("flood"))
            .try_get_matches_from(["flood"])
            .expect("every flood option has a default");
        Self::from_arg_matches(&matches).expect("the defaults parse")
    }
}

impl FloodParams {
    /// The defaults, aimed at `host:port`.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self { host: host.into(), port, ..Self::default() }
    }

    /// The defaults, spread over `targets` (at least one).
    pub fn spread(targets: impl IntoIterator<Item = impl Into<Target>>) -> Self {
        Self { targets: targets.into_iter().map(Into::into).collect(), ..Self::default() }
    }

    /// The servers devices are spread over: `targets`, or `host:port` when it is empty.
    pub fn target_list(&self) -> Vec<Target> {
        if self.targets.is_empty() {
            vec![Target::new(self.host.clone(), self.port)]
        } else {
            self.targets.clone()
        }
    }
}

/// Live totals of a running flood, for a caller that watches it while it runs (a fault test
/// reading what is in flight right before it kills the server). Cheap to clone; all clones see
/// the same flood once [`run_watched`] has started it.
#[derive(Debug, Clone, Default)]
pub struct FloodWatch {
    watched: Arc<OnceLock<Watched>>,
}

/// What a [`FloodWatch`] reads, set once the flood has started its devices.
#[derive(Debug)]
struct Watched {
    devices: Vec<Arc<DeviceProgress>>,
    targets: Arc<TargetBook>,
}

/// Totals over every device at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FloodSnapshot {
    /// Highest seq published, summed over devices.
    pub sent: u64,
    /// PUBACKs received (distinct seqs with an outbox).
    pub acked: u64,
    /// Sum over devices of `sent - acked_through`: published and not (yet) known acknowledged.
    /// With `reconnect`, exactly what the devices would resend if every connection broke now.
    pub in_flight: u64,
    /// Devices with a live connection.
    pub connected: u64,
    pub reconnects: u64,
    pub resent: u64,
}

impl FloodWatch {
    /// The totals now; all zero before the flood started.
    pub fn snapshot(&self) -> FloodSnapshot {
        let mut snapshot = FloodSnapshot::default();
        let devices = self.watched.get().map(|w| w.devices.as_slice()).unwrap_or_default();
        for p in devices {
            let sent = p.sent.load(Ordering::SeqCst);
            snapshot.sent += sent;
            snapshot.acked += p.acked.load(Ordering::SeqCst);
            snapshot.in_flight += sent.saturating_sub(p.acked_through.load(Ordering::SeqCst));
            snapshot.connected += u64::from(p.connected.load(Ordering::SeqCst));
            snapshot.reconnects += p.reconnects.load(Ordering::SeqCst);
            snapshot.resent += p.resent.load(Ordering::SeqCst);
        }
        snapshot
    }

    /// Counts per target now, in `targets` order; empty before the flood started.
    pub fn targets(&self) -> Vec<TargetCount> {
        self.watched.get().map(|w| w.targets.counts(&w.devices)).unwrap_or_default()
    }
}

/// Runs the flood and returns its report, with every device's counts in
/// [`FloodReport::devices`]; only setup mistakes are errors, connection failures are counted in
/// the report. Progress goes to stderr once a second.
pub async fn run(args: FloodParams) -> anyhow::Result<FloodReport> {
    run_watched(args, FloodWatch::default()).await
}

/// [`run`], with live totals readable through `watch` while it runs. A watch serves one flood.
pub async fn run_watched(args: FloodParams, watch: FloodWatch) -> anyhow::Result<FloodReport> {
    let unix_now = SystemTime::now().duration_since(UNIX_EPOCH).context("system clock is before 1970")?;
    let client_prefix = args.client_prefix.clone().unwrap_or_else(|| format!("load-{}", unix_now.as_secs()));
    if client_prefix.is_empty()
        || !client_prefix.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        bail!("--client-prefix {client_prefix:?}: use letters, digits, '-', '_' and '.' only");
    }
    if args.reconnect && args.qos != 1 {
        bail!("--reconnect needs --qos 1: at QoS 0 there is nothing to resend");
    }
    let connections = args.connections as usize;
    let targets = TargetBook::new(args.target_list());
    let plan = Arc::new(DevicePlan {
        targets: Arc::clone(&targets),
        qos: if args.qos == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce },
        payload_bytes: args.payload_bytes,
        rate_per_conn: args.rate_per_conn,
        max_inflight: args.max_inflight,
        client_prefix,
        duration: Duration::from_secs(args.duration_secs),
        connect_timeout: Duration::from_secs(args.connect_timeout_secs),
        drain_timeout: Duration::from_secs(args.drain_timeout_secs),
        tcp_nodelay: args.tcp_nodelay,
    });

    let last_client_id = plan.client_id(connections - 1);
    let min_len = TelemetryPayload::new(last_client_id, args.payload_bytes).min_len();
    if args.payload_bytes < min_len {
        eprintln!(
            "flood: --payload-bytes {} is below the unpadded message size (~{min_len} bytes); \
             payloads will be larger than requested",
            args.payload_bytes
        );
    }
    let target_names: Vec<String> = args.target_list().iter().map(Target::to_string).collect();
    eprintln!(
        "flood: {connections} connections to {} qos={} payload={}B duration={}s rate/conn={} \
         max_inflight={} tcp_nodelay={} reconnect={} connect_concurrency={} prefix={} label={}",
        target_names.join(","),
        args.qos,
        args.payload_bytes,
        args.duration_secs,
        if args.rate_per_conn == 0 { "max".to_owned() } else { args.rate_per_conn.to_string() },
        args.max_inflight,
        args.tcp_nodelay,
        args.reconnect,
        if args.connect_concurrency == 0 { "all".to_owned() } else { args.connect_concurrency.to_string() },
        plan.client_prefix,
        args.label
    );

    ensure_fd_limit(connections as u64 + SPARE_FDS, &format!("one per connection + {SPARE_FDS}"))?;
    if let Some(pid) = args.cpu_pid {
        process_cpu_time(pid).context("--cpu-pid")?;
    }

    let latency = Arc::new(Mutex::new(new_latency_histogram()));
    let (connected_tx, mut connected_rx) = mpsc::channel(connections);
    let (start_tx, start_rx) = watch::channel(None);
    let progress: Vec<Arc<DeviceProgress>> =
        (0..connections).map(|_| Arc::new(DeviceProgress::default())).collect();
    let watched = Watched { devices: progress.clone(), targets: Arc::clone(&targets) };
    if watch.watched.set(watched).is_err() {
        bail!("a FloodWatch serves one flood; this one already watches another");
    }
    // Held until the last device is spawned; then only the devices hold them.
    let mut wiring_ends = Some((connected_tx, start_rx));
    let spawn_device = |index: usize, (connected_tx, start_rx): &(mpsc::Sender<bool>, _)| {
        let wiring = DeviceWiring {
            progress: Arc::clone(&progress[index]),
            latency: Arc::clone(&latency),
            connected_tx: connected_tx.clone(),
            start_rx: watch::Receiver::clone(start_rx),
        };
        let plan = Arc::clone(&plan);
        if args.reconnect {
            tokio::spawn(run_outbox_device(plan, index, wiring))
        } else {
            tokio::spawn(run_device(plan, index, wiring))
        }
    };
    let first_wave = match args.connect_concurrency {
        0 => connections,
        limit => connections.min(limit as usize),
    };
    let mut devices = Vec::with_capacity(connections);
    if let Some(ends) = &wiring_ends {
        devices.extend((0..first_wave).map(|index| spawn_device(index, ends)));
    }
    if devices.len() == connections {
        wiring_ends = None;
    }

    // Every device reports once (connected or not) within its connect timeout.
    let connect_began = Instant::now();
    let (mut connected, mut failed) = (0usize, 0usize);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    while connected + failed < connections {
        tokio::select! {
            report = connected_rx.recv() => {
                match report {
                    Some(true) => connected += 1,
                    Some(false) => failed += 1,
                    None => break,
                }
                // One connect settled: the next device may start connecting.
                if let Some(ends) = &wiring_ends {
                    devices.push(spawn_device(devices.len(), ends));
                    if devices.len() == connections {
                        wiring_ends = None;
                    }
                }
            },
            _ = ticker.tick() => eprintln!(
                "flood: connecting {connected}/{connections} up, {failed} failed"
            ),
        }
    }
    eprintln!(
        "flood: {connected}/{connections} connected in {:.2}s, {failed} failed; publishing",
        connect_began.elapsed().as_secs_f64()
    );
    drop(wiring_ends);

    let start = RunStart {
        at: Instant::now(),
        unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default(),
    };
    // The server's CPU time counts from the common start: the connects are not in it.
    let cpu_meter = args.cpu_pid.and_then(|pid| match CpuMeter::start(pid) {
        Ok(meter) => Some(meter),
        Err(error) => {
            eprintln!("flood: WARNING --cpu-pid: {error}; the report has no CPU figures");
            None
        }
    });
    // Devices that already returned dropped their receivers; the rest are waiting for this.
    let _ = start_tx.send(Some(start));

    let reporter = tokio::spawn(report_progress(progress.clone(), start.at, plan.is_qos1(), args.reconnect));
    let mut outcomes = Vec::with_capacity(connections);
    let mut panicked = 0u64;
    for device in devices {
        match device.await {
            Ok(outcome) => outcomes.push(outcome),
            Err(_) => panicked += 1,
        }
    }
    reporter.abort();
    let finished_at = Instant::now();
    let target_cpu = cpu_meter.and_then(|meter| match meter.elapsed() {
        Ok(cpu) => Some(cpu),
        Err(error) => {
            eprintln!("flood: WARNING --cpu-pid {}: {error}; the report has no CPU figures", meter.pid());
            None
        }
    });

    let histogram = latency.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let mut report = summarise(&args, &outcomes, panicked, &histogram, start.at, finished_at);
    report.devices = device_counts(&plan, &progress);
    report.reconnects = progress.iter().map(|p| p.reconnects.load(Ordering::SeqCst)).sum();
    report.resent = progress.iter().map(|p| p.resent.load(Ordering::SeqCst)).sum();
    report.targets = targets.counts(&progress);
    if let Some(cpu) = target_cpu {
        let completed = if plan.is_qos1() { report.acked } else { report.sent };
        report.target_cpu_secs = Some((cpu.as_secs_f64() * 1000.0).round() / 1000.0);
        report.cpu_us_per_msg = micros_per_message(cpu, completed).map(|us| (us * 1000.0).round() / 1000.0);
        eprintln!(
            "flood: pid {} used {:.3}s CPU, {} us per {} message",
            args.cpu_pid.unwrap_or_default(),
            cpu.as_secs_f64(),
            report.cpu_us_per_msg.map_or_else(|| "n/a".to_owned(), |us| format!("{us:.2}")),
            if plan.is_qos1() { "acknowledged" } else { "written" },
        );
    }
    if args.reconnect {
        eprintln!("flood: reconnects={} resent={}", report.reconnects, report.resent);
    }
    if report.targets.len() > 1 {
        for t in &report.targets {
            eprintln!(
                "flood: target {}: assigned={} connections={} reconnects={} failed_connects={} dropped={} \
                 devices_here={}",
                t.target,
                t.assigned,
                t.connections,
                t.reconnects,
                t.failed_connects,
                t.dropped,
                t.devices_here
            );
        }
    }
    Ok(report)
}

/// Every device's counts, read from the counters its task kept (so a device whose task panicked
/// still reports what it had done).
fn device_counts(plan: &DevicePlan, progress: &[Arc<DeviceProgress>]) -> DeviceCounts {
    progress
        .iter()
        .enumerate()
        .map(|(index, p)| {
            let count = DeviceCount {
                sent: p.sent.load(Ordering::SeqCst),
                acked_through: p.acked_through.load(Ordering::SeqCst),
            };
            (plan.client_id(index), count)
        })
        .collect()
}

fn summarise(
    args: &FloodParams,
    outcomes: &[DeviceOutcome],
    panicked: u64,
    histogram: &hdrhistogram::Histogram<u64>,
    start: Instant,
    finished_at: Instant,
) -> FloodReport {
    let sent: u64 = outcomes.iter().map(|o| o.sent).sum();
    let acked: u64 = outcomes.iter().map(|o| o.acked).sum();
    let errors = outcomes.iter().filter(|o| o.error.is_some()).count() as u64 + panicked;
    // Until the last ack (QoS 1) or write (QoS 0), but never shorter than the publishing time:
    // a paced run's last message goes out one period before the deadline.
    let elapsed_secs = match outcomes.iter().filter_map(|o| o.last_progress_at).max() {
        Some(last_progress) => last_progress
            .saturating_duration_since(start)
            .max(Duration::from_secs(args.duration_secs))
            .as_secs_f64(),
        None => finished_at.saturating_duration_since(start).as_secs_f64(),
    };
    let completed = if args.qos == 1 { acked } else { sent };
    let msgs_per_sec = if elapsed_secs > 0.0 { completed as f64 / elapsed_secs } else { 0.0 };

    report_errors(outcomes, panicked);
    eprintln!(
        "flood: done: sent={sent} acked={acked} errors={errors} elapsed={elapsed_secs:.3}s \
         rate={msgs_per_sec:.0}/s"
    );

    FloodReport {
        label: args.label.clone(),
        host_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        scenario: Scenario {
            connections: args.connections as usize,
            qos: args.qos,
            payload_bytes: args.payload_bytes,
            duration_secs: args.duration_secs,
        },
        sent,
        acked,
        errors,
        elapsed_secs: (elapsed_secs * 1000.0).round() / 1000.0,
        msgs_per_sec: msgs_per_sec.round(),
        ack_latency_ms: if args.qos == 1 { LatencySummary::from_micros(histogram) } else { None },
        first_seq: 1,
        last_seq_per_device_max: outcomes.iter().map(|o| o.last_seq).max().unwrap_or(0),
        reconnects: 0,
        resent: 0,
        targets: Vec::new(),
        target_cpu_secs: None,
        cpu_us_per_msg: None,
        devices: DeviceCounts::new(),
    }
}

/// Prints each kind of failure once, with how many devices hit it and one full message.
fn report_errors(outcomes: &[DeviceOutcome], panicked: u64) {
    let mut by_class: BTreeMap<String, (u64, &DeviceError)> = BTreeMap::new();
    let mut unfinished = 0u64;
    for error in outcomes.iter().filter_map(|o| o.error.as_ref()) {
        if let DeviceError::DrainTimeout { unfinished: n } = error {
            unfinished += n;
        }
        by_class.entry(error.class()).or_insert((0, error)).0 += 1;
    }
    for (class, (count, example)) in &by_class {
        let example = example.to_string();
        if example == *class {
            eprintln!("flood: error x{count}: {class}");
        } else {
            eprintln!("flood: error x{count}: {class} (e.g. {example})");
        }
    }
    if unfinished > 0 {
        eprintln!("flood: {unfinished} publishes were still outstanding at the drain timeout");
    }
    if panicked > 0 {
        eprintln!("flood: error x{panicked}: device task panicked");
    }
}

/// Prints totals and the rate of the last second to stderr once a second.
async fn report_progress(progress: Vec<Arc<DeviceProgress>>, start: Instant, qos1: bool, reconnect: bool) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    let (mut last_sent, mut last_acked) = (0u64, 0u64);
    loop {
        ticker.tick().await;
        let sent: u64 = progress.iter().map(|p| p.sent.load(Ordering::Relaxed)).sum();
        let acked: u64 = progress.iter().map(|p| p.acked.load(Ordering::Relaxed)).sum();
        let rate = if qos1 { acked.saturating_sub(last_acked) } else { sent.saturating_sub(last_sent) };
        let reconnecting = if reconnect {
            let connected = progress.iter().filter(|p| p.connected.load(Ordering::Relaxed)).count();
            let reconnects: u64 = progress.iter().map(|p| p.reconnects.load(Ordering::Relaxed)).sum();
            format!(" connected={connected}/{} reconnects={reconnects}", progress.len())
        } else {
            String::new()
        };
        eprintln!(
            "flood: t={:.0}s sent={sent} acked={acked} in_flight={} rate={rate}/s{reconnecting}",
            start.elapsed().as_secs_f64(),
            if qos1 { sent.saturating_sub(acked) } else { 0 },
        );
        (last_sent, last_acked) = (sent, acked);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_params_are_the_cli_defaults() {
        let params = FloodParams::new("127.0.0.1", 1885);
        assert_eq!((params.host.as_str(), params.port), ("127.0.0.1", 1885));
        assert_eq!(params.connections, 100);
        assert_eq!(params.qos, 1);
        assert_eq!(params.payload_bytes, 128);
        assert_eq!(params.duration_secs, 10);
        assert_eq!(params.rate_per_conn, 0);
        assert_eq!(params.max_inflight, 100);
        assert!(params.client_prefix.is_none());
        assert!(params.targets.is_empty());
        assert_eq!(params.label, "weir");
        assert!(params.tcp_nodelay);
        assert!(!params.reconnect);
        assert_eq!((params.connect_concurrency, params.cpu_pid), (0, None));
    }

    /// A server that acknowledges the first 3 publishes of the first connection, reads 2 more
    /// and drops the connection, then acknowledges everything on later connections. Returns
    /// the seqs it received, in order, per connection.
    async fn flaky_server(listener: tokio::net::TcpListener) -> Vec<Vec<u64>> {
        use bytes::BytesMut;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use weir_protocols::mqtt::{self, ConnAck, ConnectReturnCode, Packet};

        let mut connections = Vec::new();
        for index in 0..2 {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = BytesMut::new();
            let mut seqs = Vec::new();
            'read: loop {
                while let Some(packet) = mqtt::decode(&mut buf, 1 << 20).unwrap() {
                    let mut out = BytesMut::new();
                    match packet {
                        Packet::Connect(_) => mqtt::encode(
                            &Packet::ConnAck(ConnAck {
                                session_present: false,
                                code: ConnectReturnCode::Accepted,
                            }),
                            &mut out,
                        ),
                        Packet::Publish(publish) => {
                            let json: serde_json::Value = serde_json::from_slice(&publish.payload).unwrap();
                            seqs.push(json["seq"].as_u64().unwrap());
                            if index == 0 && seqs.len() == 5 {
                                break 'read;
                            }
                            if index > 0 || seqs.len() <= 3 {
                                mqtt::encode(&Packet::PubAck(publish.pkid), &mut out);
                            }
                        }
                        Packet::Disconnect => break 'read,
                        _ => {}
                    }
                    stream.write_all(&out).await.unwrap();
                }
                if stream.read_buf(&mut buf).await.unwrap() == 0 {
                    break;
                }
            }
            connections.push(seqs);
        }
        connections
    }

    #[tokio::test]
    async fn reconnecting_devices_resend_what_was_not_acknowledged() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(flaky_server(listener));
        let mut params = FloodParams::new("127.0.0.1", port);
        params.connections = 1;
        params.rate_per_conn = 50;
        params.duration_secs = 1;
        params.max_inflight = 2;
        params.reconnect = true;
        params.client_prefix = Some("outbox".into());
        let watch = FloodWatch::default();
        let report = run_watched(params, watch.clone()).await.unwrap();
        let received = server.await.unwrap();

        // Seqs 4 and 5 reached the server but were never acknowledged: both are sent again,
        // first thing on the new connection, then the device carries on from 6.
        assert_eq!(received[0], [1, 2, 3, 4, 5]);
        assert_eq!(received[1][..3], [4, 5, 6]);
        let sent = report.devices["outbox-0"].sent;
        assert!(sent >= 45, "paced at 50/s for 1 s: {sent}");
        assert_eq!(received[1].last(), Some(&sent));
        assert_eq!(report.devices["outbox-0"].acked_through, sent);
        assert_eq!((report.reconnects, report.resent, report.errors), (1, 2, 0));
        assert_eq!(report.acked, sent);
        let snapshot = watch.snapshot();
        assert_eq!((snapshot.sent, snapshot.acked, snapshot.in_flight), (sent, sent, 0));
        assert_eq!((snapshot.reconnects, snapshot.resent, snapshot.connected), (1, 2, 0));
    }

    #[test]
    fn targets_come_from_the_cli_or_host_and_port() {
        use clap::{Args, FromArgMatches};
        let parse = |args: &[&str]| {
            let command = FloodParams::augment_args(clap::Command::new("flood"));
            let matches =
                command.try_get_matches_from(std::iter::once("flood").chain(args.iter().copied()))?;
            FloodParams::from_arg_matches(&matches)
        };
        let list =
            |params: FloodParams| params.target_list().iter().map(Target::to_string).collect::<Vec<_>>();
        assert_eq!(list(parse(&[]).unwrap()), ["127.0.0.1:1883"]);
        assert_eq!(list(parse(&["--host", "weir", "--port", "1884"]).unwrap()), ["weir:1884"]);
        assert_eq!(
            list(parse(&["--targets", "127.0.0.1:1883,127.0.0.1:1884", "--targets", "weir-2:1883"]).unwrap()),
            ["127.0.0.1:1883", "127.0.0.1:1884", "weir-2:1883"]
        );
        assert!(parse(&["--targets", "127.0.0.1:1883", "--port", "1884"]).is_err(), "one way or the other");
        assert!(parse(&["--targets", "127.0.0.1"]).is_err(), "a target needs a port");
        let spread = FloodParams::spread(["127.0.0.1:1".parse::<std::net::SocketAddr>().unwrap()]);
        assert_eq!(list(spread), ["127.0.0.1:1"]);
    }

    /// Serves one MQTT connection: CONNACK, a PUBACK for every publish; after `drop_after`
    /// publishes (if given) it returns, closing the connection. Returns the publishes read.
    async fn serve_connection(mut stream: tokio::net::TcpStream, drop_after: Option<usize>) -> usize {
        use bytes::BytesMut;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use weir_protocols::mqtt::{self, ConnAck, ConnectReturnCode, Packet};

        let mut buf = BytesMut::new();
        let mut publishes = 0;
        loop {
            while let Some(packet) = mqtt::decode(&mut buf, 1 << 20).unwrap() {
                let mut out = BytesMut::new();
                match packet {
                    Packet::Connect(_) => mqtt::encode(
                        &Packet::ConnAck(ConnAck {
                            session_present: false,
                            code: ConnectReturnCode::Accepted,
                        }),
                        &mut out,
                    ),
                    Packet::Publish(publish) => {
                        publishes += 1;
                        if drop_after == Some(publishes) {
                            return publishes;
                        }
                        mqtt::encode(&Packet::PubAck(publish.pkid), &mut out);
                    }
                    Packet::PingReq => mqtt::encode(&Packet::PingResp, &mut out),
                    Packet::Disconnect => return publishes,
                    _ => {}
                }
                if stream.write_all(&out).await.is_err() {
                    return publishes;
                }
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return publishes,
                Ok(_) => {}
            }
        }
    }

    /// Acknowledges everything on every connection until aborted.
    async fn acking_server(listener: tokio::net::TcpListener) {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(serve_connection(stream, None));
        }
    }

    /// A port nothing listens on: connects to it are refused.
    async fn closed_port() -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    }

    fn two_targets(first_port: u16, second_port: u16) -> FloodParams {
        let mut params = FloodParams::spread([
            Target::new("127.0.0.1", first_port),
            Target::new("127.0.0.1", second_port),
        ]);
        params.rate_per_conn = 50;
        params.duration_secs = 1;
        params.client_prefix = Some("spread".into());
        params
    }

    #[tokio::test]
    async fn a_device_whose_first_target_refuses_connects_to_the_next() {
        for reconnect in [false, true] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let live = listener.local_addr().unwrap().port();
            let server = tokio::spawn(acking_server(listener));
            let mut params = two_targets(closed_port().await, live);
            params.connections = 4;
            params.reconnect = reconnect;
            let report = run(params).await.unwrap();
            server.abort();

            assert_eq!((report.errors, report.reconnects), (0, 0), "reconnect={reconnect}");
            assert_eq!(report.acked, report.sent);
            assert!(report.devices.values().all(|d| d.sent > 0 && d.acked_through == d.sent));
            let [dead, live] = &report.targets[..] else { panic!("{:?}", report.targets) };
            assert_eq!(
                (dead.assigned, dead.connections, dead.failed_connects, dead.devices_here),
                (2, 0, 2, 0),
                "devices 0 and 2 start on the dead target: {dead:?}"
            );
            assert_eq!(
                (live.assigned, live.connections, live.failed_connects, live.devices_here),
                (2, 4, 0, 4),
                "and connect to the next one: {live:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_device_that_loses_its_server_reconnects_to_the_next_target() {
        // Target 0 takes 10 publishes (acking 9), then closes the connection and stops listening.
        let first = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let first_port = first.local_addr().unwrap().port();
        let crashing = tokio::spawn(async move {
            let (stream, _) = first.accept().await.unwrap();
            serve_connection(stream, Some(10)).await
        });
        let second = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let second_port = second.local_addr().unwrap().port();
        let server = tokio::spawn(acking_server(second));
        let mut params = two_targets(first_port, second_port);
        params.connections = 1;
        params.reconnect = true;
        let watch = FloodWatch::default();
        let report = run_watched(params, watch.clone()).await.unwrap();
        server.abort();
        assert_eq!(crashing.await.unwrap(), 10);

        let device = report.devices["spread-0"];
        assert_eq!((report.errors, report.reconnects), (0, 1));
        assert!(report.resent >= 1, "the unacknowledged publish went out again: {report:?}");
        assert_eq!(device.acked_through, device.sent);
        let [gone, next] = &report.targets[..] else { panic!("{:?}", report.targets) };
        assert_eq!(
            (gone.assigned, gone.connections, gone.reconnects, gone.dropped),
            (1, 1, 0, 1),
            "{gone:?}"
        );
        assert!(gone.failed_connects >= 1, "the device tried its own target again first: {gone:?}");
        assert_eq!(gone.devices_here, 0);
        assert_eq!(
            (next.assigned, next.connections, next.reconnects, next.dropped),
            (0, 1, 1, 0),
            "{next:?}"
        );
        assert_eq!((next.failed_connects, next.devices_here), (0, 1));
        assert_eq!(watch.targets(), report.targets, "the watch reads the same counts");
    }

    /// Answers each connection's CONNECT after a short wait, then serves it like
    /// [`serve_connection`]; `handshaking` counts connections accepted and not yet answered, and
    /// `most` the most there were at once.
    async fn slow_connack_server(
        listener: tokio::net::TcpListener,
        handshaking: Arc<std::sync::atomic::AtomicUsize>,
        most: Arc<std::sync::atomic::AtomicUsize>,
    ) {
        use bytes::BytesMut;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use weir_protocols::mqtt::{self, ConnAck, ConnectReturnCode, Packet};
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let now = handshaking.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            let handshaking = Arc::clone(&handshaking);
            tokio::spawn(async move {
                let mut buf = BytesMut::new();
                while !matches!(mqtt::decode(&mut buf, 1 << 20), Ok(Some(Packet::Connect(_)))) {
                    if stream.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                // Before the CONNACK: the device connects its successor only once it has it.
                handshaking.fetch_sub(1, Ordering::SeqCst);
                let mut out = BytesMut::new();
                let accepted = ConnAck { session_present: false, code: ConnectReturnCode::Accepted };
                mqtt::encode(&Packet::ConnAck(accepted), &mut out);
                if stream.write_all(&out).await.is_ok() {
                    serve_connection(stream, None).await;
                }
            });
        }
    }

    #[tokio::test]
    async fn connect_concurrency_bounds_the_handshakes_in_progress() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let handshaking = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let server = tokio::spawn(slow_connack_server(listener, Arc::clone(&handshaking), Arc::clone(&most)));
        let mut params = FloodParams::new("127.0.0.1", port);
        params.connections = 7;
        params.connect_concurrency = 2;
        params.rate_per_conn = 20;
        params.duration_secs = 1;
        params.client_prefix = Some("ramp".into());
        // The server runs in this process: its CPU time is this test's.
        params.cpu_pid = Some(std::process::id());
        let report = run(params).await.unwrap();
        server.abort();

        assert_eq!(report.errors, 0, "{report:?}");
        assert_eq!(report.devices.len(), 7);
        assert!(report.devices.values().all(|d| d.sent > 0 && d.acked_through == d.sent), "{report:?}");
        let most = most.load(Ordering::SeqCst);
        assert!((1..=2).contains(&most), "{most} handshakes at once");
        let cpu_secs = report.target_cpu_secs.expect("--cpu-pid was given");
        assert!(cpu_secs >= 0.0);
        let per_msg = report.cpu_us_per_msg.expect("messages were acknowledged");
        // Both rounded: to the millisecond and to the nanosecond per message.
        assert!((per_msg * report.acked as f64 / 1e6 - cpu_secs).abs() <= 0.001, "{report:?}");
    }

    #[tokio::test]
    async fn a_cpu_pid_that_does_not_exist_is_a_setup_error() {
        let mut params = FloodParams::new("127.0.0.1", 1);
        params.cpu_pid = Some(u32::MAX);
        let error = run(params).await.unwrap_err();
        assert!(format!("{error:#}").contains("/proc/4294967295/stat"), "{error:#}");
    }

    #[tokio::test]
    async fn reconnect_needs_qos_1() {
        let mut params = FloodParams::new("127.0.0.1", 1);
        params.qos = 0;
        params.reconnect = true;
        let error = run(params).await.unwrap_err();
        assert!(error.to_string().contains("--reconnect needs --qos 1"), "{error}");
    }
}
