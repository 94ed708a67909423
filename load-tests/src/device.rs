//! One simulated device: an MQTT 3.1.1 connection that publishes telemetry and times its PUBACKs.
//!
//! rumqttc's `EventLoop::poll` is not cancel safe (a publish taken from the request channel is
//! lost if the future is dropped while the socket is full), so it is only ever raced against the
//! hard deadline, after which the connection is abandoned anyway. Two ways of feeding it:
//! - flat out (`rate_per_conn = 0`): the device task itself tops the bounded request channel up
//!   with `try_publish` before every poll, so one task per connection does everything and no
//!   wake-up crosses tasks per message;
//! - paced: a pacer task publishes on a schedule and, once the device reports everything
//!   acknowledged, asks for the disconnect (a device idle in `poll` needs a request to wake up).

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, Outgoing, QoS};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::{timeout_at, Instant};

use crate::payload::TelemetryPayload;
use crate::targets::{TargetBook, NO_TARGET};

/// Requests queued between the device and its rumqttc event loop. Small on purpose: what is
/// queued at the deadline is still sent, and one queued request is enough to keep the loop busy.
const REQUEST_CHANNEL_CAPACITY: usize = 16;

/// Latency samples a device buffers before taking the shared histogram's lock.
pub(crate) const LATENCY_FLUSH_EVERY: usize = 256;

/// Largest latency the histogram can hold (60 s, in microseconds); larger samples saturate.
pub(crate) const LATENCY_MAX_MICROS: u64 = 60_000_000;

/// What every device of one run shares.
#[derive(Debug)]
pub struct DevicePlan {
    /// The servers, and what happened on each; see [`crate::targets`].
    pub targets: Arc<TargetBook>,
    pub qos: QoS,
    pub payload_bytes: usize,
    /// Messages per second per connection; 0 = as fast as the window allows.
    pub rate_per_conn: u32,
    /// QoS 1 publishes awaiting PUBACK per connection (rumqttc stops taking requests above it).
    pub max_inflight: u16,
    pub client_prefix: String,
    pub duration: Duration,
    pub connect_timeout: Duration,
    /// How long after the deadline outstanding publishes may take before the device gives up.
    pub drain_timeout: Duration,
    /// TCP_NODELAY on the device socket (see `--tcp-nodelay`).
    pub tcp_nodelay: bool,
}

impl DevicePlan {
    pub fn client_id(&self, index: usize) -> String {
        format!("{}-{index}", self.client_prefix)
    }

    pub fn is_qos1(&self) -> bool {
        self.qos != QoS::AtMostOnce
    }
}

/// The instant every device starts publishing, taken once all connections are settled.
#[derive(Debug, Clone, Copy)]
pub struct RunStart {
    pub at: Instant,
    pub unix_ms: u64,
}

impl RunStart {
    pub(crate) fn unix_ms_at(&self, now: Instant) -> u64 {
        self.unix_ms + now.saturating_duration_since(self.at).as_millis() as u64
    }
}

/// Counters one device writes and the progress reporter, the pacer and the final per-device
/// accounting read.
#[derive(Debug)]
pub struct DeviceProgress {
    /// Publishes written; seqs go out in order from 1, so this is also the highest seq published.
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    /// Highest seq whose PUBACK arrived (QoS 1); stays what it was if the connection breaks.
    /// With an outbox ([`crate::outbox`]): the highest seq such that every seq up to it was
    /// acknowledged.
    pub acked_through: AtomicU64,
    /// Whether the device has a live MQTT connection (CONNACK received, not yet closed).
    pub connected: AtomicBool,
    /// Connections opened after the first (outbox devices only).
    pub reconnects: AtomicU64,
    /// Publishes written again after a reconnect, with the seqs they had (outbox devices only).
    pub resent: AtomicU64,
    /// Index in the plan's targets of the current connection, or of the last one once closed;
    /// [`NO_TARGET`] before the first.
    pub target: AtomicUsize,
    /// Total publishes the pacer enqueued, once it has stopped (`u64::MAX` until then).
    pacer_enqueued: AtomicU64,
    /// Signalled when everything the pacer enqueued is sent (QoS 0) or acknowledged (QoS 1).
    drained: Notify,
}

impl Default for DeviceProgress {
    fn default() -> Self {
        Self {
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            acked_through: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
            resent: AtomicU64::new(0),
            target: AtomicUsize::new(NO_TARGET),
            pacer_enqueued: AtomicU64::new(u64::MAX),
            drained: Notify::new(),
        }
    }
}

impl DeviceProgress {
    fn completed(&self, qos1: bool) -> u64 {
        if qos1 {
            self.acked.load(Ordering::SeqCst)
        } else {
            self.sent.load(Ordering::SeqCst)
        }
    }
}

/// Ack latencies of all devices, in microseconds.
pub type SharedLatency = Arc<Mutex<Histogram<u64>>>;

pub fn new_latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_MICROS, 3).expect("constant histogram bounds are valid")
}

/// Why a device stopped early or ended with publishes unaccounted for.
#[derive(Debug, Clone)]
pub enum DeviceError {
    Connect(String),
    Connection(String),
    DrainTimeout { unfinished: u64 },
    Cancelled,
}

impl DeviceError {
    /// The error without per-device numbers, to group identical failures in the report.
    pub fn class(&self) -> String {
        match self {
            Self::Connect(reason) => format!("connect failed: {reason}"),
            Self::Connection(reason) => format!("connection broke mid-run: {reason}"),
            Self::DrainTimeout { .. } => "drain timeout: publishes still unacknowledged/unsent".to_owned(),
            Self::Cancelled => "run cancelled before start".to_owned(),
        }
    }
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DrainTimeout { unfinished } => {
                write!(f, "drain timeout with {unfinished} publishes outstanding")
            }
            other => f.write_str(&other.class()),
        }
    }
}

/// How one device's run ended.
#[derive(Debug)]
pub struct DeviceOutcome {
    pub sent: u64,
    pub acked: u64,
    /// Last seq written; seqs start at 1 and the event loop writes in order, so this is `sent`.
    pub last_seq: u64,
    pub error: Option<DeviceError>,
    /// Last ack (QoS 1) or write (QoS 0); the run's elapsed time ends at the latest of these.
    pub last_progress_at: Option<Instant>,
}

/// Everything a device task needs besides the shared plan.
pub struct DeviceWiring {
    pub progress: Arc<DeviceProgress>,
    pub latency: SharedLatency,
    /// Tells the coordinator whether this device connected.
    pub connected_tx: mpsc::Sender<bool>,
    /// Carries the common start once every device has connected or failed.
    pub start_rx: watch::Receiver<Option<RunStart>>,
}

/// Connects device `index`, waits for the common start, publishes until the deadline, waits
/// (bounded) for outstanding acks, then disconnects cleanly.
pub async fn run_device(plan: Arc<DevicePlan>, index: usize, wiring: DeviceWiring) -> DeviceOutcome {
    let DeviceWiring { progress, latency, connected_tx, mut start_rx } = wiring;
    let client_id = plan.client_id(index);
    let topic = format!("devices/{client_id}/telemetry");
    let payload = TelemetryPayload::new(client_id.clone(), plan.payload_bytes);

    let mut outcome = DeviceOutcome { sent: 0, acked: 0, last_seq: 0, error: None, last_progress_at: None };

    // The assigned target first, then each next one once (see `crate::targets`).
    let mut target = plan.targets.assign(index);
    let mut attempts = 0;
    let connected = loop {
        let (client, mut eventloop) = mqtt_client(&plan, target, &client_id, &topic);
        let error = match eventloop.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => break Ok((client, eventloop)),
            Ok(other) => DeviceError::Connect(format!("expected CONNACK, got {other:?}")),
            Err(error) => DeviceError::Connect(error.to_string()),
        };
        let next = plan.targets.connect_failed(target);
        attempts += 1;
        if attempts == plan.targets.len() {
            break Err(error);
        }
        target = next;
    };
    if connected.is_ok() {
        plan.targets.connected(target, false, &progress);
        progress.connected.store(true, Ordering::SeqCst);
    }
    // The coordinator counts every device exactly once; if it is gone the run is over anyway.
    let _ = connected_tx.send(connected.is_ok()).await;
    drop(connected_tx);
    let (client, mut eventloop) = match connected {
        Ok(connection) => connection,
        Err(error) => {
            outcome.error = Some(error);
            return outcome;
        }
    };

    let start = match start_rx.wait_for(Option::is_some).await {
        Ok(start) => *start,
        Err(_) => None,
    };
    let Some(start) = start else {
        outcome.error = Some(DeviceError::Cancelled);
        progress.connected.store(false, Ordering::SeqCst);
        return outcome;
    };
    let deadline = start.at + plan.duration;
    let hard_deadline = deadline + plan.drain_timeout;
    let qos1 = plan.is_qos1();

    let pacer = (plan.rate_per_conn > 0).then(|| {
        tokio::spawn(pace(
            Arc::clone(&plan),
            index,
            client.clone(),
            topic.clone(),
            payload.clone(),
            start,
            Arc::clone(&progress),
        ))
    });
    // Flat-out feeding state; `None` when a pacer feeds the channel.
    let mut enqueued: Option<u64> = pacer.is_none().then_some(0);
    let mut publishing = true;
    let mut disconnect_requested = false;
    // Per packet id in flight: when it was written and which seq it carries.
    let mut in_flight: Vec<Option<(Instant, u64)>> = vec![None; usize::from(plan.max_inflight) + 1];
    let mut latency_buffer: Vec<u64> = Vec::with_capacity(LATENCY_FLUSH_EVERY);
    let mut now = Instant::now();

    loop {
        if let Some(enqueued) = enqueued.as_mut() {
            if publishing && now >= deadline {
                publishing = false;
            }
            if publishing {
                while *enqueued - outcome.sent < REQUEST_CHANNEL_CAPACITY as u64 {
                    let seq = *enqueued + 1;
                    let message = payload.build(seq, start.unix_ms_at(now));
                    if client.try_publish(topic.as_str(), plan.qos, false, message).is_err() {
                        break;
                    }
                    *enqueued = seq;
                }
            } else if !disconnect_requested {
                let completed = if qos1 { outcome.acked } else { outcome.sent };
                if completed >= *enqueued {
                    // The channel is empty (everything enqueued was sent), so this cannot fail
                    // for lack of room; if the event loop is gone the poll below reports it.
                    let _ = client.try_disconnect();
                    disconnect_requested = true;
                }
            }
        }

        let event = match timeout_at(hard_deadline, eventloop.poll()).await {
            Ok(Ok(event)) => event,
            Ok(Err(error)) => {
                plan.targets.dropped(target);
                outcome.error = Some(DeviceError::Connection(error.to_string()));
                break;
            }
            Err(_elapsed) => {
                // A pacer still publishing at the hard deadline has not stored its total
                // (u64::MAX): what it enqueued is then at least what was sent.
                let paced = || match progress.pacer_enqueued.load(Ordering::SeqCst) {
                    u64::MAX => outcome.sent,
                    total => total,
                };
                let enqueued = enqueued.unwrap_or_else(paced).max(outcome.sent);
                let completed = if qos1 { outcome.acked } else { outcome.sent };
                outcome.error =
                    Some(DeviceError::DrainTimeout { unfinished: enqueued.saturating_sub(completed) });
                break;
            }
        };
        now = Instant::now();
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                outcome.sent += 1;
                progress.sent.store(outcome.sent, Ordering::SeqCst);
                if qos1 {
                    // The event loop writes publishes in the order they were enqueued, so the
                    // n-th publish written carries seq n.
                    if let Some(slot) = in_flight.get_mut(usize::from(pkid)) {
                        *slot = Some((now, outcome.sent));
                    }
                } else {
                    outcome.last_progress_at = Some(now);
                    notify_if_drained(&progress, outcome.sent);
                }
            }
            Event::Incoming(Incoming::PubAck(puback)) => {
                outcome.acked += 1;
                progress.acked.store(outcome.acked, Ordering::SeqCst);
                outcome.last_progress_at = Some(now);
                if let Some((published, seq)) =
                    in_flight.get_mut(usize::from(puback.pkid)).and_then(Option::take)
                {
                    progress.acked_through.fetch_max(seq, Ordering::SeqCst);
                    latency_buffer.push(now.duration_since(published).as_micros() as u64);
                    if latency_buffer.len() >= LATENCY_FLUSH_EVERY {
                        flush_latency(&latency, &mut latency_buffer);
                    }
                }
                notify_if_drained(&progress, outcome.acked);
            }
            Event::Outgoing(Outgoing::Disconnect) => break,
            _ => {}
        }
    }

    progress.connected.store(false, Ordering::SeqCst);
    if let Some(pacer) = pacer {
        pacer.abort();
    }
    flush_latency(&latency, &mut latency_buffer);
    outcome.last_seq = outcome.sent;
    outcome
}

/// A rumqttc client for `target` of the plan, not yet connected (the first poll connects).
fn mqtt_client(plan: &DevicePlan, target: usize, client_id: &str, topic: &str) -> (AsyncClient, EventLoop) {
    let server = plan.targets.target(target);
    let mut options = MqttOptions::new(client_id, server.host.clone(), server.port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_inflight(plan.max_inflight)
        .set_max_packet_size(64 * 1024, (plan.payload_bytes + topic.len() + 64).max(10 * 1024));
    let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CHANNEL_CAPACITY);
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(plan.tcp_nodelay);
    network.set_connection_timeout(plan.connect_timeout.as_secs().max(1));
    eventloop.set_network_options(network);
    (client, eventloop)
}

/// Where in its period a paced device sends, as a fraction of the period: device `index`'s
/// messages are due at `start + (n + phase) x period`. Spread over the period by the golden
/// ratio's fractional parts (0, 0.618, 0.236, 0.854, ...: evenly for any number of devices,
/// with no need to know it), so a paced fleet sends a steady stream, as independent devices
/// do, and not every device's message in the same instant once per period. Device 0 starts
/// at once.
pub(crate) fn pacing_phase(index: usize) -> f64 {
    const GOLDEN_RATIO_FRACTION: f64 = 0.618_033_988_749_894_9;
    (index as f64 * GOLDEN_RATIO_FRACTION).fract()
}

/// Wakes the pacer once it has stopped and everything it enqueued is done.
fn notify_if_drained(progress: &DeviceProgress, completed: u64) {
    if completed >= progress.pacer_enqueued.load(Ordering::SeqCst) {
        progress.drained.notify_one();
    }
}

pub(crate) fn flush_latency(latency: &SharedLatency, buffer: &mut Vec<u64>) {
    if buffer.is_empty() {
        return;
    }
    // A poisoned lock only means another device panicked mid-record; the counts are still usable.
    let mut histogram = latency.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for micros in buffer.drain(..) {
        histogram.saturating_record(micros.clamp(1, LATENCY_MAX_MICROS));
    }
}

/// Publishes at `rate_per_conn` until the deadline, waits until the device has everything sent
/// (QoS 0) or acknowledged (QoS 1), or the drain timeout passes, then requests the disconnect.
async fn pace(
    plan: Arc<DevicePlan>,
    index: usize,
    client: AsyncClient,
    topic: String,
    payload: TelemetryPayload,
    start: RunStart,
    progress: Arc<DeviceProgress>,
) {
    let deadline = start.at + plan.duration;
    let hard_deadline = deadline + plan.drain_timeout;
    let period = Duration::from_secs_f64(1.0 / f64::from(plan.rate_per_conn));
    let phase = pacing_phase(index);
    let mut enqueued = 0u64;
    loop {
        // Scheduled from the start rather than from the last send, so a slow send is caught up.
        let due = start.at + period.mul_f64(enqueued as f64 + phase);
        if due >= deadline {
            break;
        }
        tokio::time::sleep_until(due).await;
        let seq = enqueued + 1;
        let message = payload.build(seq, start.unix_ms_at(Instant::now()));
        let publish = client.publish(topic.as_str(), plan.qos, false, message);
        match timeout_at(hard_deadline, publish).await {
            Ok(Ok(())) => enqueued = seq,
            // The event loop is gone (the device task records why) or is wedged past the drain.
            Ok(Err(_)) | Err(_) => return,
        }
    }

    progress.pacer_enqueued.store(enqueued, Ordering::SeqCst);
    while progress.completed(plan.is_qos1()) < enqueued {
        if timeout_at(hard_deadline, progress.drained.notified()).await.is_err() {
            // The device task's own hard deadline ends the connection.
            return;
        }
    }
    let _ = timeout_at(hard_deadline, client.disconnect()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_phases_spread_devices_evenly_over_the_period() {
        assert_eq!(pacing_phase(0), 0.0);
        for devices in [10usize, 100, 10_000] {
            let mut tenths = [0usize; 10];
            for index in 0..devices {
                let phase = pacing_phase(index);
                assert!((0.0..1.0).contains(&phase), "{phase}");
                tenths[(phase * 10.0) as usize] += 1;
            }
            let (fewest, most) = (tenths.iter().min().unwrap(), tenths.iter().max().unwrap());
            assert!(most - fewest <= 2 + devices / 500, "{devices} devices: {tenths:?}");
        }
    }
}
