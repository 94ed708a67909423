//! One simulated device of a scenario: connects (bound to one of the source addresses), publishes
//! on its group's schedule with at most `max_inflight` messages unanswered, times every answer,
//! reconnects when its connection drops (a storm, or the server) and then resends what was not
//! answered with the seqs it had, and at the end waits (bounded) for the last answers and closes
//! cleanly.
//!
//! Everything a device writes at one moment goes out in one write (many messages per syscall
//! when flat out; one per packet when paced, as real devices do).

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::{sleep, sleep_until, timeout, Duration, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;
use weir_protocols::mqtt::ProtocolVersion;

use super::stats::{LatencyBuffer, Stats};
use super::wire::{self, Answer, Payloads};
use super::{DeviceGroup, PayloadFormat, Protocol};
use crate::report::DeviceCount;

/// MQTT keepalive asked for; a PINGREQ goes out after half of it without a write.
const KEEPALIVE_S: u16 = 60;
/// A connect and its handshake (CONNECT/CONNACK, the WebSocket upgrade) must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Wait before reconnecting after the server closed or refused (a storm reconnects at once).
const RECONNECT_BACKOFF: Duration = Duration::from_secs(1);
/// Messages a flat-out QoS 0 device writes per write.
const QOS0_CHUNK: usize = 32;
/// A paced device that fell behind (window full) catches up at most this much of its schedule.
const MAX_CATCH_UP: Duration = Duration::from_secs(1);
/// How long a device waits for the server to close its end after a clean close.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// The kernel send buffer of a QoS 0 device (Linux doubles it). Small, so what the generator
/// counts as written is close to what the server has read: loopback would otherwise queue
/// megabytes per connection.
const QOS0_SEND_BUFFER_BYTES: u32 = 64 * 1024;
/// The client's WebSocket read buffer (tungstenite's default, 128 KiB, would cost the generator
/// over a gigabyte at 10,000 devices).
const WS_READ_BUFFER_BYTES: usize = 4096;

/// One group as its devices see it.
#[derive(Debug)]
pub struct GroupPlan {
    pub index: usize,
    pub config: DeviceGroup,
    pub addr: SocketAddr,
    /// The rate multiplier of a burst in progress, as `f64` bits (1.0 otherwise).
    pub burst_factor: AtomicU64,
    /// A reconnect storm: its generation and the share of devices it hits.
    pub storm: watch::Sender<(u64, f64)>,
}

impl GroupPlan {
    pub fn new(index: usize, config: DeviceGroup, addr: SocketAddr) -> Self {
        Self {
            index,
            config,
            addr,
            burst_factor: AtomicU64::new(1.0f64.to_bits()),
            storm: watch::channel((0, 0.0)).0,
        }
    }

    pub fn set_burst_factor(&self, factor: f64) {
        self.burst_factor.store(factor.to_bits(), Ordering::Relaxed);
    }

    fn interval(&self) -> Option<Duration> {
        let rate = self.config.rate * f64::from_bits(self.burst_factor.load(Ordering::Relaxed));
        (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate))
    }

    pub fn device_id(&self, index: usize) -> String {
        format!("{}-{index}", self.config.id_prefix())
    }
}

/// What every device of the run shares.
#[derive(Debug)]
pub struct Shared {
    pub start: Instant,
    pub start_unix_ms: u64,
    pub drain_deadline: Instant,
    pub source_addrs: Vec<IpAddr>,
    pub connect_permits: Semaphore,
    pub stats: Stats,
    /// Turns true when publishing ends (the run's duration, or Ctrl-C).
    pub stop: watch::Receiver<bool>,
}

impl Shared {
    fn micros_since_start(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_micros() as u64
    }

    fn unix_ms(&self, now: Instant) -> u64 {
        self.start_unix_ms + now.saturating_duration_since(self.start).as_millis() as u64
    }
}

/// Runs device `index` of `group` (`global` counts across groups, for the source addresses)
/// from its ramp-up slot to the end; returns what it sent and had answered.
pub async fn run_device(
    shared: Arc<Shared>,
    group: Arc<GroupPlan>,
    index: usize,
    global: usize,
) -> DeviceCount {
    let config = &group.config;
    let ramp = Duration::from_secs_f64(config.ramp_up_s * index as f64 / config.count as f64);
    let mut device = Device::new(&shared, &group, index, global);
    let mut stop = shared.stop.clone();
    tokio::select! {
        _ = sleep_until(shared.start + ramp) => {}
        _ = stopped(&mut stop) => return device.count(),
    }
    let mut storms = group.storm.subscribe();
    storms.mark_unchanged();
    loop {
        if *stop.borrow() && !device.has_unanswered() {
            break;
        }
        if Instant::now() >= shared.drain_deadline {
            device.give_up();
            break;
        }
        let connection = {
            let _permit = shared.connect_permits.acquire().await.expect("the semaphore is never closed");
            timeout(HANDSHAKE_TIMEOUT, device.connect()).await
        };
        let connection = match connection {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => {
                shared.stats.error(group.index, &format!("connect: {error}"), 1);
                device.backoff(&mut stop).await;
                continue;
            }
            Err(_) => {
                shared.stats.error(group.index, "connect: no answer within 10 s", 1);
                device.backoff(&mut stop).await;
                continue;
            }
        };
        shared.stats.connected(group.index);
        let end = device.session(connection, &mut storms, &mut stop).await;
        shared.stats.disconnected(group.index);
        match end {
            SessionEnd::Finished => break,
            SessionEnd::Storm => shared.stats.count(group.index, |c| &c.reconnects, 1),
            SessionEnd::Broken(reason) => {
                shared.stats.error(group.index, &reason, 1);
                shared.stats.count(group.index, |c| &c.reconnects, 1);
                device.backoff(&mut stop).await;
            }
        }
    }
    device.latency.flush(&shared.stats, group.index, Instant::now());
    device.count()
}

/// How one connection ended.
enum SessionEnd {
    /// The run is over for this device.
    Finished,
    /// A reconnect storm dropped it; reconnect at once.
    Storm,
    /// It broke or the server closed it; reconnect after a pause.
    Broken(String),
}

/// One live connection.
enum Connection {
    /// MQTT over TCP, raw TCP.
    Stream { stream: TcpStream, read: BytesMut },
    /// MQTT over WebSocket (packets inside binary messages), WebSocket ingest.
    Ws { ws: Box<WebSocketStream<TcpStream>>, read: BytesMut },
}

struct Device<'a> {
    shared: &'a Shared,
    group: &'a GroupPlan,
    config: &'a DeviceGroup,
    global: usize,
    device_id: String,
    topic: String,
    payloads: Payloads,
    version: Option<ProtocolVersion>,
    /// The next seq to publish; seqs start at 1.
    next_seq: u64,
    /// Every seq up to this one is answered with success.
    acked_through: u64,
    /// A refusal freezes `acked_through` (the refused message is not in the sink).
    refused_any: bool,
    /// Written and unanswered, oldest first: seq and when it was written.
    inflight: VecDeque<(u64, Instant)>,
    /// Unanswered messages of a broken connection, resent first on the next one.
    resend: VecDeque<u64>,
    window: usize,
    latency: LatencyBuffer,
    out: Vec<u8>,
    /// Where each message in `out` ends (WebSocket ingest sends one message each).
    ends: Vec<usize>,
    scratch: Vec<u8>,
    answers: Vec<Answer>,
}

impl<'a> Device<'a> {
    fn new(shared: &'a Shared, group: &'a GroupPlan, index: usize, global: usize) -> Self {
        let config = &group.config;
        let device_id = group.device_id(index);
        Self {
            shared,
            group,
            config,
            global,
            topic: config.topic.replace("{device}", &device_id),
            payloads: Payloads::new(config.payload, &device_id, config.payload_bytes),
            version: wire::mqtt_version(config.protocol),
            device_id,
            next_seq: 1,
            acked_through: 0,
            refused_any: false,
            inflight: VecDeque::new(),
            resend: VecDeque::new(),
            window: config.max_inflight,
            latency: LatencyBuffer::new(Instant::now()),
            out: Vec::new(),
            ends: Vec::new(),
            scratch: Vec::new(),
            answers: Vec::new(),
        }
    }

    fn count(&self) -> DeviceCount {
        DeviceCount { sent: self.next_seq - 1, acked_through: self.acked_through }
    }

    fn acked(&self) -> bool {
        self.config.acked()
    }

    fn has_unanswered(&self) -> bool {
        !self.inflight.is_empty() || !self.resend.is_empty()
    }

    /// The drain deadline passed with messages unanswered: each is an error.
    fn give_up(&mut self) {
        let unanswered = (self.inflight.len() + self.resend.len()) as u64;
        if unanswered > 0 {
            self.shared.stats.error(self.group.index, "unanswered at the drain deadline", unanswered);
        }
        self.inflight.clear();
        self.resend.clear();
    }

    async fn backoff(&self, stop: &mut watch::Receiver<bool>) {
        // Spread the retries of many devices over the pause instead of a synchronised wave.
        let jitter = Duration::from_millis(splitmix(self.global as u64 ^ self.next_seq) % 500);
        tokio::select! {
            _ = sleep(RECONNECT_BACKOFF + jitter) => {}
            _ = sleep_until(self.shared.drain_deadline) => {}
            _ = stopped(stop), if !self.has_unanswered() => {}
        }
    }

    async fn connect(&mut self) -> anyhow::Result<Connection> {
        let source = (!self.shared.source_addrs.is_empty())
            .then(|| self.shared.source_addrs[self.global % self.shared.source_addrs.len()]);
        let send_buffer = (!self.acked()).then_some(QOS0_SEND_BUFFER_BYTES);
        let stream = connect_from(source, self.group.addr, send_buffer).await?;
        stream.set_nodelay(true)?;
        let protocol = self.config.protocol;
        let mut connection = match protocol {
            Protocol::Mqtt3 | Protocol::Mqtt5 | Protocol::Tcp | Protocol::TcpLines => {
                Connection::Stream { stream, read: BytesMut::with_capacity(256) }
            }
            Protocol::MqttWs | Protocol::Ws => {
                let path = match protocol {
                    Protocol::MqttWs => "/mqtt".to_owned(),
                    _ => format!("/ingest?device={}", self.device_id),
                };
                let mut request = format!("ws://{}{path}", self.group.addr).into_client_request()?;
                if protocol == Protocol::MqttWs {
                    request.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
                }
                let config = WebSocketConfig::default().read_buffer_size(WS_READ_BUFFER_BYTES);
                let (ws, _) =
                    tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await?;
                Connection::Ws { ws: Box::new(ws), read: BytesMut::new() }
            }
        };
        self.window = self.config.max_inflight;
        if let Some(version) = self.version {
            let mut connect = BytesMut::new();
            wire::write_connect(version, &self.device_id, KEEPALIVE_S, &mut connect);
            connection.send(protocol, false, &connect, &[]).await?;
            loop {
                connection.read(protocol, &mut self.answers).await?;
                match self.answers.drain(..).next() {
                    Some(Answer::ConnAck { receive_maximum }) => {
                        if let Some(maximum) = receive_maximum {
                            self.window = self.window.min(usize::from(maximum).max(1));
                        }
                        break;
                    }
                    Some(Answer::ConnRefused(reason)) => anyhow::bail!("refused: {reason}"),
                    Some(other) => anyhow::bail!("{other:?} before CONNACK"),
                    None => {}
                }
            }
        } else if matches!(protocol, Protocol::Tcp | Protocol::TcpLines) {
            let mut hello = Vec::new();
            wire::write_hello(protocol, &self.device_id, &mut hello);
            connection.send(protocol, false, &hello, &[]).await?;
        }
        Ok(connection)
    }

    /// Appends message `seq` to the write buffer, framed for the protocol.
    fn push_message(&mut self, seq: u64, now: Instant) {
        self.scratch.clear();
        self.payloads.write(seq, self.shared.unix_ms(now), &mut self.scratch);
        match self.version {
            Some(version) => {
                // Packet ids cycle through 1..=65535; at most `window` are in flight.
                let pkid = (((seq - 1) % 65_535) + 1) as u16;
                wire::write_publish(
                    version,
                    self.config.qos,
                    pkid,
                    &self.topic,
                    &self.scratch,
                    &mut self.out,
                );
            }
            None if self.config.protocol == Protocol::Ws => self.out.extend_from_slice(&self.scratch),
            None => wire::write_tcp_message(self.config.protocol, &self.scratch, &mut self.out),
        }
        self.ends.push(self.out.len());
        if self.acked() {
            self.inflight.push_back((seq, now));
        }
    }

    /// Publishes on schedule and reads answers until the run ends for this connection.
    async fn session(
        &mut self,
        mut connection: Connection,
        storms: &mut watch::Receiver<(u64, f64)>,
        stop: &mut watch::Receiver<bool>,
    ) -> SessionEnd {
        let protocol = self.config.protocol;
        let group = self.group.index;
        let stats = &self.shared.stats;
        let now = Instant::now();
        // What the previous connection left unanswered goes first, with the same seqs.
        let resent = self.resend.len() as u64;
        while let Some(seq) = self.resend.pop_front() {
            self.push_message(seq, now);
        }
        if resent > 0 {
            stats.count(group, |c| &c.resent, resent);
        }
        // Each device at its own point of the period, so a paced fleet that connected together
        // sends a steady stream rather than one burst per period.
        let phase = crate::device::pacing_phase(self.global);
        let mut next_due = self.group.interval().map_or(now, |interval| now + interval.mul_f64(phase));
        let mut last_write = now;
        let mut stopping = *stop.borrow();
        loop {
            let now = Instant::now();
            if !stopping {
                let room =
                    if self.acked() { self.window.saturating_sub(self.inflight.len()) } else { QOS0_CHUNK };
                match self.group.interval() {
                    None => {
                        for _ in 0..room {
                            let seq = self.next_seq;
                            self.next_seq += 1;
                            self.push_message(seq, now);
                        }
                    }
                    Some(interval) => {
                        if next_due + MAX_CATCH_UP < now {
                            next_due = now.checked_sub(MAX_CATCH_UP).unwrap_or(now);
                        }
                        let mut room = room;
                        while next_due <= now && room > 0 {
                            let seq = self.next_seq;
                            self.next_seq += 1;
                            self.push_message(seq, now);
                            next_due += interval;
                            room -= 1;
                        }
                    }
                }
            }
            if !self.ends.is_empty() {
                let messages = self.ends.len() as u64;
                let written = self.out.len() as u64;
                let text = self.config.payload == PayloadFormat::Json;
                let sent = tokio::time::timeout_at(
                    self.shared.drain_deadline,
                    connection.send(protocol, text, &self.out, &self.ends),
                );
                match sent.await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        self.out.clear();
                        self.ends.clear();
                        return self.broken(format!("write: {error}"));
                    }
                    Err(_) => {
                        // The server stopped reading and the run is over.
                        stats.error(group, "write still blocked at the drain deadline", 1);
                        self.give_up();
                        return SessionEnd::Finished;
                    }
                }
                self.out.clear();
                self.ends.clear();
                last_write = Instant::now();
                stats.count(group, |c| &c.sent, messages);
                stats.count(group, |c| &c.bytes_sent, written);
                if !self.acked() {
                    stats.progress_at(self.shared.micros_since_start(last_write));
                }
            }
            if stopping && self.inflight.is_empty() {
                // Answered messages need no more waiting for; QoS 0 ones are in only once the
                // server has read up to the DISCONNECT.
                let until =
                    if self.acked() { Instant::now() + CLOSE_WAIT } else { self.shared.drain_deadline };
                if let Some(closed) = connection.close(self.version, until).await {
                    if !self.acked() {
                        stats.progress_at(self.shared.micros_since_start(closed));
                    }
                }
                return SessionEnd::Finished;
            }
            let flat_out_room = !stopping
                && self.group.interval().is_none()
                && (!self.acked() || self.inflight.len() < self.window);
            let paced = !stopping
                && self.group.interval().is_some()
                && (!self.acked() || self.inflight.len() < self.window);
            let ping_at = last_write + Duration::from_secs(u64::from(KEEPALIVE_S) / 2);
            tokio::select! {
                biased;
                read = connection.read(protocol, &mut self.answers) => {
                    if let Err(error) = read {
                        return self.broken(error.to_string());
                    }
                    if let Some(reason) = self.take_answers() {
                        return self.broken(reason);
                    }
                }
                changed = storms.changed() => {
                    if changed.is_ok() {
                        let (generation, fraction) = *storms.borrow_and_update();
                        let draw = splitmix(self.global as u64 ^ (generation << 40)) % 1_000_000;
                        let hit = (draw as f64) < fraction * 1_000_000.0;
                        if hit {
                            // Dropped like a lost network: no DISCONNECT, the socket just closes.
                            drop(connection);
                            self.resend.extend(self.inflight.drain(..).map(|(seq, _)| seq));
                            return SessionEnd::Storm;
                        }
                    }
                }
                _ = stopped(stop), if !stopping => stopping = true,
                // After the storm and stop arms: a flat-out device is always ready to write.
                _ = std::future::ready(()), if flat_out_room => {}
                _ = sleep_until(next_due), if paced => {}
                _ = sleep_until(ping_at), if self.version.is_some() => {
                    let mut ping = BytesMut::new();
                    weir_protocols::mqtt::encode(&weir_protocols::mqtt::Packet::PingReq, &mut ping);
                    if let Err(error) = connection.send(protocol, false, &ping, &[]).await {
                        return self.broken(format!("write: {error}"));
                    }
                    last_write = Instant::now();
                }
                _ = sleep_until(self.shared.drain_deadline), if stopping => {
                    self.give_up();
                    connection.close(self.version, Instant::now() + CLOSE_WAIT).await;
                    return SessionEnd::Finished;
                }
            }
        }
    }

    /// Matches the answers read to the oldest unanswered messages; `Some(reason)` when the
    /// server is closing the connection.
    fn take_answers(&mut self) -> Option<String> {
        let now = Instant::now();
        let stats = &self.shared.stats;
        let group = self.group.index;
        let mut closing = None;
        let (mut acked, mut refused) = (0, 0);
        for answer in self.answers.drain(..) {
            match answer {
                Answer::Acked | Answer::Refused(_) => {
                    let Some((seq, sent_at)) = self.inflight.pop_front() else {
                        closing = Some("an answer to a message that was not sent".to_owned());
                        break;
                    };
                    if let Answer::Refused(reason) = answer {
                        refused += 1;
                        self.refused_any = true;
                        stats.note_reason(&format!("refused: {reason}"), 1);
                    } else {
                        acked += 1;
                        if !self.refused_any {
                            self.acked_through = seq;
                        }
                        let micros = now.saturating_duration_since(sent_at).as_micros() as u64;
                        self.latency.record(stats, group, micros, now);
                    }
                }
                Answer::Disconnect(reason) => closing = Some(format!("server disconnected: {reason}")),
                Answer::ConnAck { .. } | Answer::ConnRefused(_) => {
                    closing = Some("a CONNACK in the middle of the session".to_owned())
                }
                Answer::Other => {}
            }
        }
        if acked > 0 {
            stats.count(group, |c| &c.acked, acked);
            stats.progress_at(self.shared.micros_since_start(now));
        }
        if refused > 0 {
            stats.count(group, |c| &c.refused, refused);
        }
        closing
    }

    fn broken(&mut self, reason: String) -> SessionEnd {
        self.resend.extend(self.inflight.drain(..).map(|(seq, _)| seq));
        SessionEnd::Broken(reason)
    }
}

impl Connection {
    /// Writes `bytes`; for WebSocket ingest, `ends` splits them into one message each.
    async fn send(
        &mut self,
        protocol: Protocol,
        text: bool,
        bytes: &[u8],
        ends: &[usize],
    ) -> anyhow::Result<()> {
        match self {
            Connection::Stream { stream, .. } => stream.write_all(bytes).await?,
            Connection::Ws { ws, .. } if protocol == Protocol::Ws => {
                let mut start = 0;
                for &end in ends {
                    let body = &bytes[start..end];
                    start = end;
                    let message = match std::str::from_utf8(body) {
                        Ok(json) if text => WsMessage::text(json),
                        _ => WsMessage::binary(body.to_vec()),
                    };
                    ws.feed(message).await?;
                }
                ws.flush().await?;
            }
            Connection::Ws { ws, .. } => ws.send(WsMessage::binary(bytes.to_vec())).await?,
        }
        Ok(())
    }

    /// Reads what the server sent next and parses its answers into `answers`. Cancel safe: a
    /// read cut short leaves the bytes (or the WebSocket message) for the next call.
    async fn read(&mut self, protocol: Protocol, answers: &mut Vec<Answer>) -> anyhow::Result<()> {
        match self {
            Connection::Stream { stream, read } => {
                if stream.read_buf(read).await? == 0 {
                    anyhow::bail!("the server closed the connection");
                }
                wire::parse_stream(protocol, read, answers)?;
            }
            Connection::Ws { ws, read } => match ws.next().await {
                Some(Ok(WsMessage::Binary(bytes))) if protocol == Protocol::MqttWs => {
                    read.extend_from_slice(&bytes);
                    wire::parse_stream(protocol, read, answers)?;
                }
                Some(Ok(WsMessage::Binary(bytes))) => answers.push(wire::ack_frame(&bytes)?),
                Some(Ok(WsMessage::Text(text))) => answers.push(wire::json_answer(text.as_bytes())?),
                Some(Ok(WsMessage::Close(frame))) => {
                    anyhow::bail!("the server closed the WebSocket: {frame:?}")
                }
                Some(Ok(_)) => answers.push(Answer::Other),
                Some(Err(error)) => return Err(error.into()),
                None => anyhow::bail!("the server closed the connection"),
            },
        }
        Ok(())
    }

    /// A clean end: MQTT DISCONNECT, a WebSocket close, a TCP shutdown, then the server's close
    /// awaited until `until`. Returns when the server closed its end: after a DISCONNECT that is
    /// when it has read everything before it (what QoS 0 throughput is measured to). Errors are
    /// ignored (the run is over for this device either way).
    async fn close(self, version: Option<ProtocolVersion>, until: Instant) -> Option<Instant> {
        let mut disconnect = BytesMut::new();
        if let Some(version) = version {
            wire::write_disconnect(version, &mut disconnect);
        }
        match self {
            Connection::Stream { mut stream, mut read } => {
                let closed = async {
                    stream.write_all(&disconnect).await?;
                    stream.shutdown().await?;
                    loop {
                        read.clear();
                        if stream.read_buf(&mut read).await? == 0 {
                            return Ok::<_, std::io::Error>(Instant::now());
                        }
                    }
                };
                tokio::time::timeout_at(until, closed).await.ok().and_then(Result::ok)
            }
            Connection::Ws { mut ws, .. } => {
                let closed = async {
                    if !disconnect.is_empty() {
                        ws.send(WsMessage::binary(disconnect.to_vec())).await?;
                    }
                    ws.close().await?;
                    while let Some(message) = ws.next().await {
                        message?;
                    }
                    Ok::<_, tokio_tungstenite::tungstenite::Error>(Instant::now())
                };
                tokio::time::timeout_at(until, closed).await.ok().and_then(Result::ok)
            }
        }
    }
}

/// Returns once publishing has ended (the guard `wait_for` hands out is not `Send`).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// A TCP connection to `target`, bound to `source` (any port) when given, with a fixed kernel
/// send buffer when given.
pub async fn connect_from(
    source: Option<IpAddr>,
    target: SocketAddr,
    send_buffer: Option<u32>,
) -> std::io::Result<TcpStream> {
    let socket = if target.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(bytes) = send_buffer {
        socket.set_send_buffer_size(bytes)?;
    }
    if let Some(ip) = source {
        // Lets the kernel hand out a port whose previous connection is still in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(target).await
}

/// A well-mixed 64-bit hash (SplitMix64's finaliser): which devices a storm hits, retry jitter.
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Milliseconds since the Unix epoch now.
pub fn unix_ms_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
