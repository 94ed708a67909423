//! A simulated device with an outbox, for `flood --reconnect`: it keeps every QoS 1 publish
//! until its PUBACK arrives, and when the connection drops (the server crashed or restarted) it
//! reconnects with backoff, resends the whole outbox in seq order with the same seqs and bytes,
//! and carries on, as a real device with persistent storage does.
//!
//! Built on weir's own MQTT codec rather than rumqttc: across reconnects every packet id must
//! map to a known seq, and rumqttc drops unsent requests on a clean-session reconnect without
//! saying which. One task per device does all the I/O; only cancel-safe futures (a socket read,
//! timers) are raced, writes run to completion (bounded by the hard deadline).

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout_at, Instant};
use weir_protocols::mqtt::{self, Connect, ConnectReturnCode, Packet, Publish, QoS};

use crate::device::{
    flush_latency, pacing_phase, DeviceError, DeviceOutcome, DevicePlan, DeviceProgress, DeviceWiring,
    RunStart, SharedLatency, LATENCY_FLUSH_EVERY,
};
use crate::payload::TelemetryPayload;

/// Keepalive announced in CONNECT; a PINGREQ goes out after half of it without a write.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// First wait before reconnecting; doubled per failed attempt up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Largest packet accepted from the server (it only sends CONNACK, PUBACK and PINGRESP).
const MAX_INCOMING_PACKET: usize = 64 * 1024;

/// What the device published and has not had acknowledged, and its totals.
#[derive(Debug, Default)]
struct Outbox {
    /// Published and awaiting PUBACK, by seq: the exact message, resent as it is.
    unacked: BTreeMap<u64, Bytes>,
    /// Highest seq published (seqs go out in order from 1).
    sent: u64,
    /// Distinct seqs acknowledged.
    acked: u64,
}

impl Outbox {
    /// The highest seq such that every seq up to it is acknowledged.
    fn acked_through(&self) -> u64 {
        self.unacked.first_key_value().map_or(self.sent, |(&seq, _)| seq - 1)
    }
}

/// One live connection: its halves, read buffer, and the packet ids in flight on it.
struct Link {
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    read_buf: BytesMut,
    write_buf: BytesMut,
    /// Packet id → (seq, when it was written). Packet ids belong to one connection.
    in_flight: HashMap<u16, (u64, Instant)>,
    next_pkid: u16,
    last_write: Instant,
}

impl Link {
    /// A packet id not in flight on this connection (there are far fewer in flight than ids).
    fn allocate_pkid(&mut self) -> u16 {
        loop {
            let pkid = self.next_pkid;
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.in_flight.contains_key(&pkid) {
                return pkid;
            }
        }
    }

    /// Encodes a QoS 1 PUBLISH of `seq` into the write buffer and tracks its packet id.
    fn queue_publish(&mut self, topic: &str, seq: u64, message: Bytes, now: Instant) {
        let pkid = self.allocate_pkid();
        let publish = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: topic.into(),
            pkid,
            payload: message,
        };
        mqtt::encode(&Packet::Publish(publish), &mut self.write_buf);
        self.in_flight.insert(pkid, (seq, now));
    }

    /// Writes what is queued; bounded by `until`.
    async fn flush(&mut self, until: Instant) -> Result<(), String> {
        if self.write_buf.is_empty() {
            return Ok(());
        }
        match timeout_at(until, self.writer.write_all(&self.write_buf)).await {
            Ok(Ok(())) => {
                self.write_buf.clear();
                self.last_write = Instant::now();
                Ok(())
            }
            Ok(Err(error)) => Err(format!("write: {error}")),
            Err(_) => Err("write blocked past the drain deadline".into()),
        }
    }
}

/// Reconnect waits: exponential from [`BACKOFF_MIN`] to [`BACKOFF_MAX`], each stretched by a
/// random 0..50% (within the bounds) so a fleet that lost the server at once does not return in
/// lockstep.
struct Backoff {
    next: Duration,
    random: std::collections::hash_map::RandomState,
    draws: u64,
}

impl Backoff {
    fn new() -> Self {
        Backoff { next: BACKOFF_MIN, random: Default::default(), draws: 0 }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    fn wait(&mut self) -> Duration {
        let mut hasher = self.random.build_hasher();
        hasher.write_u64(self.draws);
        self.draws += 1;
        let fraction = (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64;
        let wait = self.next.mul_f64(1.0 + 0.5 * fraction).min(BACKOFF_MAX);
        self.next = (self.next * 2).min(BACKOFF_MAX);
        wait
    }
}

/// Opens a connection to `target` of the plan and completes CONNECT/CONNACK (clean session: the
/// outbox, not the server, remembers what is unacknowledged), within the plan's connect timeout.
async fn open_link(plan: &DevicePlan, target: usize, client_id: &str) -> Result<Link, String> {
    let server = plan.targets.target(target);
    let handshake = async {
        let stream = TcpStream::connect((server.host.as_str(), server.port))
            .await
            .map_err(|e| format!("connect to {server}: {e}"))?;
        stream.set_nodelay(plan.tcp_nodelay).map_err(|e| format!("TCP_NODELAY: {e}"))?;
        let (mut reader, mut writer) = stream.into_split();
        let mut out = BytesMut::new();
        let connect = Connect {
            protocol_level: 4,
            clean_session: true,
            keep_alive_secs: KEEP_ALIVE.as_secs() as u16,
            client_id: client_id.to_owned(),
            will: None,
            username: None,
            password: None,
        };
        mqtt::encode(&Packet::Connect(connect), &mut out);
        writer.write_all(&out).await.map_err(|e| format!("write CONNECT: {e}"))?;
        let mut read_buf = BytesMut::with_capacity(4096);
        loop {
            match mqtt::decode(&mut read_buf, MAX_INCOMING_PACKET) {
                Ok(Some(Packet::ConnAck(ack))) if ack.code == ConnectReturnCode::Accepted => break,
                Ok(Some(Packet::ConnAck(ack))) => return Err(format!("CONNACK refused: {:?}", ack.code)),
                Ok(Some(other)) => return Err(format!("expected CONNACK, got {other:?}")),
                Ok(None) => {}
                Err(error) => return Err(format!("malformed reply: {error}")),
            }
            match reader.read_buf(&mut read_buf).await {
                Ok(0) => return Err("closed before CONNACK".into()),
                Ok(_) => {}
                Err(error) => return Err(format!("read CONNACK: {error}")),
            }
        }
        Ok(Link {
            reader,
            writer,
            read_buf,
            write_buf: BytesMut::with_capacity(16 * 1024),
            in_flight: HashMap::new(),
            next_pkid: 1,
            last_write: Instant::now(),
        })
    };
    match tokio::time::timeout(plan.connect_timeout, handshake).await {
        Ok(result) => result,
        Err(_) => Err(format!("no CONNACK within {:?}", plan.connect_timeout)),
    }
}

/// Connects device `index`, waits for the common start, publishes until the deadline (paced,
/// or as fast as the in-flight window allows), surviving connection losses, then waits
/// (bounded) until the outbox is empty and disconnects cleanly.
pub async fn run_outbox_device(plan: Arc<DevicePlan>, index: usize, wiring: DeviceWiring) -> DeviceOutcome {
    let DeviceWiring { progress, latency, connected_tx, mut start_rx } = wiring;
    let client_id = plan.client_id(index);
    let mut outcome = DeviceOutcome { sent: 0, acked: 0, last_seq: 0, error: None, last_progress_at: None };

    // The assigned target first, then each next one once (see `crate::targets`).
    let mut target = plan.targets.assign(index);
    let mut attempts = 0;
    let first = loop {
        match open_link(&plan, target, &client_id).await {
            Ok(link) => break Ok(link),
            Err(error) => {
                let next = plan.targets.connect_failed(target);
                attempts += 1;
                if attempts == plan.targets.len() {
                    break Err(DeviceError::Connect(error));
                }
                target = next;
            }
        }
    };
    if first.is_ok() {
        plan.targets.connected(target, false, &progress);
        progress.connected.store(true, Ordering::SeqCst);
    }
    let _ = connected_tx.send(first.is_ok()).await;
    drop(connected_tx);
    let mut link = match first {
        Ok(link) => Some(link),
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

    let mut device = OutboxDevice {
        topic: format!("devices/{client_id}/telemetry"),
        payload: TelemetryPayload::new(client_id.clone(), plan.payload_bytes),
        client_id,
        plan,
        target,
        start,
        progress,
        latency,
        latency_buffer: Vec::with_capacity(LATENCY_FLUSH_EVERY),
        phase: pacing_phase(index),
        outbox: Outbox::default(),
        outcome,
    };
    device.run(&mut link).await;
    device.progress.connected.store(false, Ordering::SeqCst);
    flush_latency(&device.latency, &mut device.latency_buffer);
    device.outcome.sent = device.outbox.sent;
    device.outcome.acked = device.outbox.acked;
    device.outcome.last_seq = device.outbox.sent;
    device.outcome
}

struct OutboxDevice {
    plan: Arc<DevicePlan>,
    /// The target of the current connection, or the one to try next while there is none.
    target: usize,
    client_id: String,
    topic: String,
    payload: TelemetryPayload,
    start: RunStart,
    progress: Arc<DeviceProgress>,
    latency: SharedLatency,
    latency_buffer: Vec<u64>,
    /// Where in each period this device's paced messages are due (see `pacing_phase`).
    phase: f64,
    outbox: Outbox,
    outcome: DeviceOutcome,
}

impl OutboxDevice {
    async fn run(&mut self, link: &mut Option<Link>) {
        let deadline = self.start.at + self.plan.duration;
        let hard_deadline = deadline + self.plan.drain_timeout;
        let period = (self.plan.rate_per_conn > 0)
            .then(|| Duration::from_secs_f64(1.0 / f64::from(self.plan.rate_per_conn)));
        let window = usize::from(self.plan.max_inflight);
        let mut backoff = Backoff::new();
        let mut last_connect_error = String::new();

        loop {
            let now = Instant::now();
            let publishing = now < deadline;
            let Some(live) = link.as_mut() else {
                if !publishing && self.outbox.unacked.is_empty() {
                    return;
                }
                if now >= hard_deadline {
                    self.outcome.error = Some(DeviceError::Connection(format!(
                        "still reconnecting at the drain deadline; last failure: {last_connect_error}"
                    )));
                    return;
                }
                let _ = timeout_at(hard_deadline, tokio::time::sleep(backoff.wait())).await;
                match timeout_at(hard_deadline, open_link(&self.plan, self.target, &self.client_id)).await {
                    Ok(Ok(new_link)) => {
                        backoff.reset();
                        self.progress.reconnects.fetch_add(1, Ordering::SeqCst);
                        self.plan.targets.connected(self.target, true, &self.progress);
                        *link = Some(new_link);
                        match self.resend(link.as_mut().expect("just set"), hard_deadline).await {
                            // Connected once the outbox is on its way again.
                            Ok(()) => self.progress.connected.store(true, Ordering::SeqCst),
                            Err(error) => {
                                last_connect_error = error;
                                self.drop_link(link);
                            }
                        }
                    }
                    Ok(Err(error)) => {
                        last_connect_error = error;
                        self.target = self.plan.targets.connect_failed(self.target);
                    }
                    Err(_) => {}
                }
                continue;
            };

            // New publishes: due ones, while the window has room.
            let mut next_due = None;
            if publishing {
                while self.outbox.unacked.len() < window {
                    let seq = self.outbox.sent + 1;
                    if let Some(period) = period {
                        let due = self.start.at + period.mul_f64((seq - 1) as f64 + self.phase);
                        if due >= deadline {
                            break;
                        }
                        if due > now {
                            next_due = Some(due);
                            break;
                        }
                    }
                    let message = Bytes::from(self.payload.build(seq, self.start.unix_ms_at(now)));
                    live.queue_publish(&self.topic, seq, message.clone(), now);
                    self.outbox.unacked.insert(seq, message);
                    self.outbox.sent = seq;
                }
            } else if self.outbox.unacked.is_empty() {
                live.write_buf.clear();
                mqtt::encode(&Packet::Disconnect, &mut live.write_buf);
                let _ = live.flush(hard_deadline).await;
                self.close_link(link);
                return;
            }
            if !live.write_buf.is_empty() {
                let result = live.flush(hard_deadline).await;
                // Published counts once the bytes are handed to the socket.
                self.progress.sent.store(self.outbox.sent, Ordering::SeqCst);
                if let Err(error) = result {
                    last_connect_error = error;
                    self.drop_link(link);
                    continue;
                }
            }

            let ping_at = live.last_write + KEEP_ALIVE / 2;
            let publish_at = next_due.filter(|_| publishing && self.outbox.unacked.len() < window);
            let read = tokio::select! {
                read = live.reader.read_buf(&mut live.read_buf) => Some(read),
                _ = sleep_until(publish_at.unwrap_or(hard_deadline)), if publish_at.is_some() => None,
                // Publishing stops at the deadline; the loop then waits for the outbox to drain.
                _ = sleep_until(deadline), if publishing => None,
                _ = sleep_until(ping_at) => {
                    mqtt::encode(&Packet::PingReq, &mut live.write_buf);
                    None
                }
                _ = sleep_until(hard_deadline) => {
                    self.outcome.error = Some(self.drain_timeout());
                    self.close_link(link);
                    return;
                }
            };
            match read {
                None => {}
                Some(Ok(0)) => {
                    last_connect_error = "connection closed by the server".into();
                    self.drop_link(link);
                }
                Some(Err(error)) => {
                    last_connect_error = format!("read: {error}");
                    self.drop_link(link);
                }
                Some(Ok(_)) => {
                    if let Err(error) = self.take_replies(link.as_mut().expect("live")) {
                        last_connect_error = error;
                        self.drop_link(link);
                    }
                }
            }
        }
    }

    /// Handles every whole packet in the read buffer.
    fn take_replies(&mut self, live: &mut Link) -> Result<(), String> {
        loop {
            match mqtt::decode(&mut live.read_buf, MAX_INCOMING_PACKET) {
                Ok(Some(Packet::PubAck(pkid))) => {
                    let now = Instant::now();
                    let Some((seq, written)) = live.in_flight.remove(&pkid) else {
                        return Err(format!("PUBACK for packet id {pkid}, which is not in flight"));
                    };
                    if self.outbox.unacked.remove(&seq).is_some() {
                        self.outbox.acked += 1;
                        self.progress.acked.store(self.outbox.acked, Ordering::SeqCst);
                        self.progress.acked_through.store(self.outbox.acked_through(), Ordering::SeqCst);
                        self.outcome.last_progress_at = Some(now);
                        self.latency_buffer.push(now.duration_since(written).as_micros() as u64);
                        if self.latency_buffer.len() >= LATENCY_FLUSH_EVERY {
                            flush_latency(&self.latency, &mut self.latency_buffer);
                        }
                    }
                }
                Ok(Some(Packet::PingResp)) => {}
                Ok(Some(other)) => return Err(format!("unexpected packet from the server: {other:?}")),
                Ok(None) => return Ok(()),
                Err(error) => return Err(format!("malformed packet from the server: {error}")),
            }
        }
    }

    /// Writes the whole outbox again, oldest first, on a fresh connection.
    async fn resend(&mut self, live: &mut Link, until: Instant) -> Result<(), String> {
        let now = Instant::now();
        for (&seq, message) in &self.outbox.unacked {
            live.queue_publish(&self.topic, seq, message.clone(), now);
        }
        self.progress.resent.fetch_add(self.outbox.unacked.len() as u64, Ordering::SeqCst);
        live.flush(until).await
    }

    /// The connection broke: counted against its target, which is tried first again.
    fn drop_link(&self, link: &mut Option<Link>) {
        self.plan.targets.dropped(self.target);
        self.close_link(link);
    }

    /// The device is done with the connection (clean end, or it gave up at the deadline).
    fn close_link(&self, link: &mut Option<Link>) {
        *link = None;
        self.progress.connected.store(false, Ordering::SeqCst);
    }

    fn drain_timeout(&self) -> DeviceError {
        DeviceError::DrainTimeout { unfinished: self.outbox.unacked.len() as u64 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acked_through_is_the_acknowledged_prefix() {
        let mut outbox = Outbox { sent: 5, acked: 2, ..Outbox::default() };
        outbox.unacked.insert(3, Bytes::new());
        outbox.unacked.insert(5, Bytes::new());
        assert_eq!(outbox.acked_through(), 2);
        outbox.unacked.remove(&3);
        assert_eq!(outbox.acked_through(), 4, "5 is still out");
        outbox.unacked.clear();
        assert_eq!(outbox.acked_through(), 5);
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_and_resets() {
        let mut backoff = Backoff::new();
        let waits: Vec<Duration> = (0..8).map(|_| backoff.wait()).collect();
        assert!(waits[0] >= BACKOFF_MIN && waits[0] <= BACKOFF_MIN * 3 / 2, "{waits:?}");
        assert!(waits[1] >= BACKOFF_MIN * 2 && waits[1] <= BACKOFF_MIN * 3, "{waits:?}");
        assert!(waits.iter().all(|w| *w <= BACKOFF_MAX), "{waits:?}");
        assert_eq!(waits[7], BACKOFF_MAX, "{waits:?}");
        backoff.reset();
        assert!(backoff.wait() <= BACKOFF_MIN * 3 / 2);
    }
}
