//! `weir-load idle`: weir's own memory per idle device connection. Opens N connections over one
//! protocol, has each one do one acknowledged message and then fall silent, and reads weir's
//! resident memory before and after.
//!
//! The figure is `(RSS after - RSS before) / N` of the weir process (`VmRSS` in
//! `/proc/PID/status`). RSS is what an operator sees and what the OOM killer counts, and it is
//! the conservative choice: it also holds file pages touched for the first time and allocator
//! pages already freed but not yet returned (`LazyFree`). The anonymous part (`RssAnon`: heap,
//! stacks) and `/proc/PID/smaps_rollup`'s `Private_Dirty`, `Anonymous` and `LazyFree` are
//! reported alongside, so a reader can see how much of the growth is heap. Kernel socket
//! buffers are kernel memory and are in neither.
//!
//! Warm-up connections are opened (and kept open) before the first reading, so one-time costs
//! (the first batch through the fabric and the sink, metric labels, thread-local caches) are not
//! spread over the measured connections.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;
use weir_proto::v1::{device_payload, Hello};
use weir_proto::{Ack, AckStatus, DevicePayload, MetricValue, Reading};
use weir_protocols::framing::{encode_frame, Frame, Framer, Framing};
use weir_protocols::mqtt::{self, ConnAck, Connect, ConnectReturnCode, Packet, Publish, QoS};

use crate::fd_limit::ensure_fd_limit;
use crate::payload::TelemetryPayload;

/// Largest reply accepted from weir during the handshake (a CONNACK, a PUBACK or an ack frame
/// are a few bytes; anything near this is not weir talking).
const MAX_REPLY_BYTES: usize = 64 * 1024;

/// The client's WebSocket read buffer. tungstenite's default (128 KiB, zero-filled on the
/// first read) would cost the generator 1.3 GB at 10,000 connections.
const WS_CLIENT_READ_BUFFER_BYTES: usize = 4096;

/// File descriptors the generator needs besides its connections (stdio, epoll, /proc reads).
const SPARE_FDS: u64 = 64;

/// The packet id of the one QoS 1 publish each MQTT connection makes.
const MQTT_PUBLISH_PKID: u16 = 1;

/// The `seq` of the one reading each connection sends.
const READING_SEQ: u64 = 1;

/// The device protocol whose idle connections are measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IdleProtocol {
    /// MQTT 3.1.1 over TCP: CONNECT (keepalive 0), CONNACK, one QoS 1 PUBLISH and its PUBACK.
    Mqtt,
    /// WebSocket ingest: upgrade on `/ingest?device=ID`, one binary reading and its binary ack.
    Ws,
    /// Raw TCP with length-prefixed protobuf frames: a hello, one reading and its ack frame.
    Tcp,
}

impl IdleProtocol {
    /// weir's memory budget per idle connection of this protocol.
    pub fn target_bytes(self) -> u64 {
        match self {
            IdleProtocol::Mqtt | IdleProtocol::Tcp => 2048,
            IdleProtocol::Ws => 8192,
        }
    }

    /// The name used on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            IdleProtocol::Mqtt => "mqtt",
            IdleProtocol::Ws => "ws",
            IdleProtocol::Tcp => "tcp",
        }
    }

    /// What the connection waits for last, for error messages.
    fn last_answer(self) -> &'static str {
        match self {
            IdleProtocol::Mqtt => "CONNACK/PUBACK",
            IdleProtocol::Ws => "101 Switching Protocols/ack",
            IdleProtocol::Tcp => "ack frame",
        }
    }
}

impl fmt::Display for IdleProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The options of `weir-load idle`.
#[derive(Debug, Clone, clap::Args)]
pub struct IdleParams {
    #[arg(long, value_enum)]
    pub protocol: IdleProtocol,
    /// Idle connections measured (on top of the warm-up ones).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub connections: u32,
    /// weir's listener for the protocol, `ip:port`.
    #[arg(long)]
    pub target: SocketAddr,
    /// weir's process id: its `/proc/PID/status` and `/proc/PID/smaps_rollup` are read.
    #[arg(long)]
    pub weir_pid: u32,
    /// Local addresses the connections are bound to, round-robin (e.g.
    /// `127.0.0.2,127.0.0.3`): each has its own ephemeral port range. None: the kernel picks.
    #[arg(long, value_delimiter = ',')]
    pub source_addrs: Vec<IpAddr>,
    /// Handshakes in progress at once. The figure grows with it (MQTT on 2 cores: ~4.6 KB at 1,
    /// ~5.2 KB at 200): memory weir used for connections busy at the same time stays resident in
    /// its allocator after they fall idle. The default keeps that small and the run short.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
    /// Connections opened and kept open before the first memory reading, so one-time costs
    /// are not counted per connection.
    #[arg(long, default_value_t = 100)]
    pub warmup: u32,
    /// Wait after the last handshake (and after closing) before reading weir's memory.
    #[arg(long, default_value_t = 5)]
    pub settle_secs: u64,
    /// Deadline for one connection's whole handshake; the first connection to miss it fails the
    /// run (a listener that does not answer fails it within this time, it never hangs).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub handshake_timeout_secs: u64,
    /// Device ids (and MQTT client ids) are `{prefix}-{i}`. Letters, digits, `-`, `_`, `.`.
    #[arg(long, default_value = "idle")]
    pub device_prefix: String,
    /// Diagnostic: only the protocol handshake (CONNECT/CONNACK, the upgrade, the hello), no
    /// message. Compared with a normal run, it tells what one message leaves behind in weir.
    /// On raw TCP nothing answers a hello, so the connection is not confirmed.
    #[arg(long)]
    pub skip_message: bool,
}

/// One reading of the weir process's memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemorySample {
    /// `VmRSS`: resident pages, anonymous and file-backed.
    pub rss: u64,
    /// `RssAnon`: resident anonymous pages (heap, stacks).
    pub rss_anon: u64,
    /// `Private_Dirty` from `smaps_rollup`, when the kernel has it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_dirty: Option<u64>,
    /// `Anonymous` from `smaps_rollup`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anonymous: Option<u64>,
    /// `LazyFree` from `smaps_rollup`: pages the allocator gave back with `MADV_FREE`, still
    /// counted in RSS until the kernel needs them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy_free: Option<u64>,
}

/// Why weir's memory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MemoryReadError {
    #[error("cannot read /proc/{pid}/status (is weir running with that pid?)")]
    Status { pid: u32, source: std::io::Error },
    #[error("/proc/{pid}/status has no {field} line")]
    MissingField { pid: u32, field: &'static str },
}

/// Reads the memory figures of process `pid`.
pub fn read_memory(pid: u32) -> Result<MemorySample, MemoryReadError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|source| MemoryReadError::Status { pid, source })?;
    let field = |name: &'static str| {
        kib_field(&status, name).ok_or(MemoryReadError::MissingField { pid, field: name })
    };
    let (rss, rss_anon) = (field("VmRSS")?, field("RssAnon")?);
    // Older kernels, or a hardened /proc: the status figures are enough.
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    Ok(MemorySample {
        rss,
        rss_anon,
        private_dirty: kib_field(&rollup, "Private_Dirty"),
        anonymous: kib_field(&rollup, "Anonymous"),
        lazy_free: kib_field(&rollup, "LazyFree"),
    })
}

/// The value of a `Name:   1234 kB` line of a /proc file, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(':')?;
        let kib = rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
        Some(kib * 1024)
    })
}

/// The machine the figure was measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub mem_total_bytes: Option<u64>,
}

impl Machine {
    /// Reads `/proc`; fields it cannot read say `unknown`.
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == "model name").then(|| value.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self {
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            kernel,
            mem_total_bytes: kib_field(&meminfo, "MemTotal"),
        }
    }
}

/// Memory readings of one run.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryReadings {
    /// With only the warm-up connections open.
    pub before: MemorySample,
    /// With every connection open and idle for `settle_secs`.
    pub after: MemorySample,
    /// `settle_secs` after every connection was closed (absent if weir could not be read).
    pub after_close: Option<MemorySample>,
}

/// What `weir-load idle` prints: one JSON object.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    pub scenario: &'static str,
    pub protocol: IdleProtocol,
    /// Measured connections (warm-up ones not included).
    pub connections: u32,
    pub warmup_connections: u32,
    /// `--skip-message`: the connections did only the protocol handshake.
    pub skip_message: bool,
    /// weir's listener.
    pub address: SocketAddr,
    pub source_addrs: Vec<IpAddr>,
    pub weir_pid: u32,
    pub rss_before: u64,
    pub rss_after: u64,
    /// `(rss_after - rss_before) / connections`, rounded: the figure judged against the target.
    pub bytes_per_connection: i64,
    /// The same from `RssAnon` (heap and stacks only).
    pub anon_bytes_per_connection: i64,
    pub target_bytes: u64,
    pub passed: bool,
    /// Connections still open (no EOF from weir) when `after` was read, warm-up included.
    pub open_after_settle: usize,
    pub establish_secs: f64,
    pub settle_secs: u64,
    pub memory: MemoryReadings,
    pub machine: Machine,
    /// UTC, when the `after` reading was taken.
    pub date: String,
}

impl IdleReport {
    /// One line for people: the figure, the target and the verdict.
    pub fn summary_line(&self) -> String {
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        format!(
            "SUMMARY idle-{}: {} idle connections: weir RSS {:.1} MiB -> {:.1} MiB, {} B/connection \
             (anonymous {} B), target {} B: {} [{} cores, {}, kernel {}, {}]",
            self.protocol,
            self.connections,
            mib(self.rss_before),
            mib(self.rss_after),
            self.bytes_per_connection,
            self.anon_bytes_per_connection,
            self.target_bytes,
            if self.passed { "PASS" } else { "FAIL" },
            self.machine.cores,
            self.machine.cpu_model,
            self.machine.kernel,
            self.date,
        )
    }
}

/// Why one connection could not be made idle.
#[derive(Debug, thiserror::Error)]
pub enum EstablishError {
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("no {0} within the handshake timeout")]
    Timeout(&'static str),
    #[error("weir closed the connection before its {0}")]
    Closed(&'static str),
    #[error("unexpected answer: {0}")]
    Unexpected(String),
    #[error("weir refused: {0}")]
    Refused(String),
    #[error("WebSocket: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
}

/// An established, idle connection; it is only held, never read, until the run closes it.
#[derive(Debug)]
pub enum IdleConnection {
    Mqtt(TcpStream),
    Ws(Box<WebSocketStream<TcpStream>>),
    Tcp(TcpStream),
}

impl IdleConnection {
    fn socket(&self) -> &TcpStream {
        match self {
            IdleConnection::Mqtt(stream) | IdleConnection::Tcp(stream) => stream,
            IdleConnection::Ws(ws) => ws.get_ref(),
        }
    }

    /// False once weir closed its end. Does not wake weir up: nothing is written.
    fn is_open(&self) -> bool {
        let mut byte = [0u8; 1];
        match self.socket().try_read(&mut byte) {
            Ok(0) => false,
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        }
    }
}

/// What every connection of a run shares.
#[derive(Debug)]
struct Plan {
    protocol: IdleProtocol,
    target: SocketAddr,
    source_addrs: Vec<IpAddr>,
    device_prefix: String,
    handshake_timeout: Duration,
    skip_message: bool,
}

impl Plan {
    fn device_id(&self, index: u64) -> String {
        format!("{}-{index}", self.device_prefix)
    }

    fn source_addr(&self, index: u64) -> Option<IpAddr> {
        (!self.source_addrs.is_empty())
            .then(|| self.source_addrs[(index % self.source_addrs.len() as u64) as usize])
    }
}

/// Runs the scenario and returns its report; any connection that cannot be established fails
/// the run (the figure would be per the wrong count).
pub async fn run(params: IdleParams) -> anyhow::Result<IdleReport> {
    let prefix = &params.device_prefix;
    if prefix.is_empty()
        || !prefix.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        bail!("--device-prefix {prefix:?}: use letters, digits, '-', '_' and '.' only");
    }
    if let Some(bad) = params.source_addrs.iter().find(|ip| ip.is_ipv4() != params.target.is_ipv4()) {
        bail!("--source-addrs {bad} is not of the same IP version as --target {}", params.target);
    }
    let total = u64::from(params.connections) + u64::from(params.warmup);
    ensure_fd_limit(total + SPARE_FDS, &format!("connections + warm-up + {SPARE_FDS}"))?;
    let machine = Machine::read();
    read_memory(params.weir_pid)?;

    let plan = Arc::new(Plan {
        protocol: params.protocol,
        target: params.target,
        source_addrs: params.source_addrs.clone(),
        device_prefix: params.device_prefix.clone(),
        handshake_timeout: Duration::from_secs(params.handshake_timeout_secs),
        skip_message: params.skip_message,
    });
    let concurrency = params.concurrency as usize;
    let settle = Duration::from_secs(params.settle_secs);
    let protocol = params.protocol;

    let warmup = establish_all(&plan, 0..u64::from(params.warmup), concurrency)
        .await
        .with_context(|| format!("{protocol} warm-up against {}", plan.target))?;
    eprintln!("idle: {} {protocol} warm-up connections open; settling {}s", warmup.len(), params.settle_secs);
    tokio::time::sleep(settle).await;
    let before = read_memory(params.weir_pid)?;

    let started = Instant::now();
    let measured = establish_all(&plan, u64::from(params.warmup)..total, concurrency)
        .await
        .with_context(|| format!("{protocol} connections against {}", plan.target))?;
    let establish_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "idle: {} {protocol} connections established and idle in {establish_secs:.1}s; settling {}s",
        measured.len(),
        params.settle_secs
    );
    tokio::time::sleep(settle).await;
    let after = read_memory(params.weir_pid)?;
    let date = utc_timestamp(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs());
    let open_after_settle = warmup.iter().chain(&measured).filter(|c| c.is_open()).count();

    drop(measured);
    drop(warmup);
    tokio::time::sleep(settle).await;
    let after_close = read_memory(params.weir_pid).ok();

    if open_after_settle as u64 != total {
        bail!(
            "weir closed {} of the {total} idle {protocol} connections while they were idle; \
             the figure would be per the wrong count (idle timeout set on the listener?)",
            total - open_after_settle as u64
        );
    }
    let per_connection = |after: u64, before: u64| {
        ((after as f64 - before as f64) / f64::from(params.connections)).round() as i64
    };
    let bytes_per_connection = per_connection(after.rss, before.rss);
    let target_bytes = protocol.target_bytes();
    Ok(IdleReport {
        scenario: "idle",
        protocol,
        connections: params.connections,
        warmup_connections: params.warmup,
        skip_message: params.skip_message,
        address: params.target,
        source_addrs: params.source_addrs,
        weir_pid: params.weir_pid,
        rss_before: before.rss,
        rss_after: after.rss,
        bytes_per_connection,
        anon_bytes_per_connection: per_connection(after.rss_anon, before.rss_anon),
        target_bytes,
        passed: bytes_per_connection <= target_bytes as i64,
        open_after_settle,
        establish_secs,
        settle_secs: params.settle_secs,
        memory: MemoryReadings { before, after, after_close },
        machine,
        date,
    })
}

/// Establishes connections `indices`, at most `concurrency` handshakes at once. The first
/// failure aborts the handshakes in flight and fails the whole set.
async fn establish_all(
    plan: &Arc<Plan>,
    indices: Range<u64>,
    concurrency: usize,
) -> anyhow::Result<Vec<IdleConnection>> {
    let count = indices.end - indices.start;
    let mut open = Vec::with_capacity(count as usize);
    let mut handshakes = JoinSet::new();
    let mut next = indices.start;
    loop {
        while handshakes.len() < concurrency && next < indices.end {
            let plan = Arc::clone(plan);
            let index = next;
            handshakes.spawn(async move {
                let outcome = tokio::time::timeout(plan.handshake_timeout, establish(&plan, index)).await;
                (index, outcome.unwrap_or(Err(EstablishError::Timeout(plan.protocol.last_answer()))))
            });
            next += 1;
        }
        match handshakes.join_next().await {
            None => return Ok(open),
            Some(Ok((_, Ok(connection)))) => open.push(connection),
            Some(Ok((index, Err(error)))) => {
                let device = plan.device_id(index);
                bail!("connection {device} failed after {} of {count} were established: {error}", open.len());
            }
            Some(Err(join_error)) => bail!("a handshake task failed: {join_error}"),
        }
    }
}

/// Opens one connection and takes it through the protocol's handshake and one acknowledged
/// message.
async fn establish(plan: &Plan, index: u64) -> Result<IdleConnection, EstablishError> {
    let device_id = plan.device_id(index);
    let mut stream =
        connect_from(plan.source_addr(index), plan.target).await.map_err(EstablishError::Connect)?;
    // Small request/answer exchanges: no reason to wait for Nagle.
    stream.set_nodelay(true)?;
    match plan.protocol {
        IdleProtocol::Mqtt => {
            mqtt_handshake(&mut stream, &device_id, plan.skip_message).await?;
            Ok(IdleConnection::Mqtt(stream))
        }
        IdleProtocol::Ws => {
            let ws = ws_handshake(stream, plan.target, &device_id, plan.skip_message).await?;
            Ok(IdleConnection::Ws(Box::new(ws)))
        }
        IdleProtocol::Tcp => {
            tcp_handshake(&mut stream, &device_id, plan.skip_message).await?;
            Ok(IdleConnection::Tcp(stream))
        }
    }
}

/// A TCP connection to `target`, bound to `source` (any port) when given.
async fn connect_from(source: Option<IpAddr>, target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if target.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(ip) = source {
        // Lets the kernel hand out a port whose previous connection is still in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(target).await
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// CONNECT (3.1.1, keepalive 0, clean session), CONNACK, then (unless `skip_message`) one QoS 1
/// PUBLISH and its PUBACK.
async fn mqtt_handshake(
    stream: &mut TcpStream,
    client_id: &str,
    skip_message: bool,
) -> Result<(), EstablishError> {
    let mut out = BytesMut::new();
    mqtt::encode(&Packet::Connect(mqtt_connect(client_id)), &mut out);
    stream.write_all(&out).await?;
    let mut buf = BytesMut::new();
    match read_mqtt_packet(stream, &mut buf, "CONNACK").await? {
        Packet::ConnAck(ConnAck { code: ConnectReturnCode::Accepted, .. }) => {}
        Packet::ConnAck(ConnAck { code, .. }) => {
            return Err(EstablishError::Refused(format!("CONNACK {code:?}")))
        }
        other => return Err(EstablishError::Unexpected(format!("{other:?} instead of CONNACK"))),
    }
    if skip_message {
        return Ok(());
    }
    out.clear();
    mqtt::encode(&Packet::Publish(mqtt_publish(client_id)), &mut out);
    stream.write_all(&out).await?;
    match read_mqtt_packet(stream, &mut buf, "PUBACK").await? {
        Packet::PubAck(MQTT_PUBLISH_PKID) => {}
        other => {
            return Err(EstablishError::Unexpected(format!(
                "{other:?} instead of PUBACK {MQTT_PUBLISH_PKID}"
            )))
        }
    }
    if !buf.is_empty() {
        return Err(EstablishError::Unexpected(format!("{} bytes after the PUBACK", buf.len())));
    }
    Ok(())
}

fn mqtt_connect(client_id: &str) -> Connect {
    Connect {
        protocol_level: 4,
        clean_session: true,
        // No keepalive: the connection stays silent for as long as it is measured.
        keep_alive_secs: 0,
        client_id: client_id.to_owned(),
        will: None,
        username: None,
        password: None,
    }
}

fn mqtt_publish(client_id: &str) -> Publish {
    let payload = TelemetryPayload::new(client_id.to_owned(), 0).build(READING_SEQ, now_ms());
    Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: format!("idle/{client_id}"),
        pkid: MQTT_PUBLISH_PKID,
        payload: payload.into(),
    }
}

async fn read_mqtt_packet(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    awaited: &'static str,
) -> Result<Packet, EstablishError> {
    loop {
        match mqtt::decode(buf, MAX_REPLY_BYTES) {
            Ok(Some(packet)) => return Ok(packet),
            Ok(None) => {}
            Err(error) => {
                return Err(EstablishError::Unexpected(format!("undecodable MQTT packet: {error}")))
            }
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(EstablishError::Closed(awaited));
        }
    }
}

/// Upgrade on `/ingest?device=ID` (101), then (unless `skip_message`) one binary reading and its
/// binary ack.
async fn ws_handshake(
    stream: TcpStream,
    target: SocketAddr,
    device_id: &str,
    skip_message: bool,
) -> Result<WebSocketStream<TcpStream>, EstablishError> {
    let url = format!("ws://{target}/ingest?device={device_id}");
    let config =
        WebSocketConfig::default().read_buffer_size(WS_CLIENT_READ_BUFFER_BYTES).write_buffer_size(0);
    // Returns only after a 101 Switching Protocols with a valid Sec-WebSocket-Accept.
    let (mut ws, _response) = tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await?;
    if skip_message {
        return Ok(ws);
    }
    ws.send(WsMessage::Binary(reading_payload(now_ms()).encode_to_vec().into())).await?;
    loop {
        match ws.next().await {
            Some(Ok(WsMessage::Binary(bytes))) => {
                let ack = Ack::decode(bytes).map_err(|e| {
                    EstablishError::Unexpected(format!("binary reply is not a weir.v1.Ack: {e}"))
                })?;
                check_ack(&ack)?;
                return Ok(ws);
            }
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
            Some(Ok(WsMessage::Close(frame))) => {
                return Err(EstablishError::Refused(format!("closed with {frame:?} instead of an ack")))
            }
            Some(Ok(other)) => {
                return Err(EstablishError::Unexpected(format!("{other:?} instead of a binary ack")))
            }
            Some(Err(error)) => return Err(error.into()),
            None => return Err(EstablishError::Closed("ack")),
        }
    }
}

/// A hello frame and one reading frame (written together), then the reading's ack frame; with
/// `skip_message`, only the hello (which gets no answer).
async fn tcp_handshake(
    stream: &mut TcpStream,
    device_id: &str,
    skip_message: bool,
) -> Result<(), EstablishError> {
    let mut out = Vec::new();
    write_frame(&hello_payload(device_id), &mut out);
    if skip_message {
        stream.write_all(&out).await?;
        return Ok(());
    }
    write_frame(&reading_payload(now_ms()), &mut out);
    stream.write_all(&out).await?;
    let mut buf = BytesMut::new();
    loop {
        match read_frame(&mut buf, MAX_REPLY_BYTES)? {
            Some(frame) => {
                let ack = Ack::decode(frame).map_err(|e| {
                    EstablishError::Unexpected(format!("reply frame is not a weir.v1.Ack: {e}"))
                })?;
                check_ack(&ack)?;
                if !buf.is_empty() {
                    return Err(EstablishError::Unexpected(format!(
                        "{} bytes after the ack frame",
                        buf.len()
                    )));
                }
                return Ok(());
            }
            None => {
                if stream.read_buf(&mut buf).await? == 0 {
                    return Err(EstablishError::Closed("ack frame"));
                }
            }
        }
    }
}

/// `DevicePayload{hello: Hello{device_id}}`: names the device of a raw TCP connection.
pub fn hello_payload(device_id: &str) -> DevicePayload {
    DevicePayload { body: Some(device_payload::Body::Hello(Hello { device_id: device_id.to_owned() })) }
}

/// One reading with `seq` 1 and no device id (the connection names the device).
pub fn reading_payload(ts_ms: u64) -> DevicePayload {
    let temp = MetricValue { kind: Some(weir_proto::metric_value::Kind::Number(crate::payload::TEMP)) };
    DevicePayload {
        body: Some(device_payload::Body::Reading(Reading {
            device_id: String::new(),
            seq: Some(READING_SEQ),
            ts_ms: Some(ts_ms as i64),
            metrics: [("temp".to_owned(), temp)].into(),
            tags: Default::default(),
        })),
    }
}

/// Appends a length-prefixed frame (weir's TCP framing): u32 big-endian length, then the
/// protobuf bytes.
pub fn write_frame(payload: &DevicePayload, out: &mut Vec<u8>) {
    encode_frame(Framing::LengthPrefixed, &payload.encode_to_vec(), out);
}

/// Splits one length-prefixed frame's body off the front of `buf` with weir's own framer;
/// `Ok(None)`: more bytes needed. A length above `max_frame_bytes` is an error before any of
/// the body is buffered.
pub fn read_frame(
    buf: &mut BytesMut,
    max_frame_bytes: usize,
) -> Result<Option<bytes::Bytes>, EstablishError> {
    let mut framer = Framer::new(Framing::LengthPrefixed, max_frame_bytes);
    loop {
        match framer.decode(buf) {
            Ok(Some(Frame::Message(body))) => return Ok(Some(body)),
            Ok(Some(Frame::Heartbeat)) => continue,
            Ok(None) => return Ok(None),
            Err(error) => return Err(EstablishError::Unexpected(format!("reply: {error}"))),
        }
    }
}

/// The ack of the one reading: OK, message 1, seq 1.
fn check_ack(ack: &Ack) -> Result<(), EstablishError> {
    if ack.status != AckStatus::Ok as i32 {
        let status =
            AckStatus::try_from(ack.status).map_or_else(|_| ack.status.to_string(), |s| format!("{s:?}"));
        return Err(EstablishError::Refused(format!("ack status {status}: {}", ack.reason)));
    }
    if ack.n != 1 || ack.seq != Some(READING_SEQ) {
        return Err(EstablishError::Unexpected(format!(
            "ack n={} seq={:?}, expected n=1 seq={READING_SEQ}",
            ack.n, ack.seq
        )));
    }
    Ok(())
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the Unix epoch.
pub fn utc_timestamp(unix_secs: u64) -> String {
    let (days, secs) = (unix_secs / 86_400, unix_secs % 86_400);
    // Days to civil date in the proleptic Gregorian calendar, eras of 400 years from 0000-03-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153; // 0 = March
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    #[test]
    fn hello_and_reading_frames_are_length_prefixed_protobuf() {
        let mut out = Vec::new();
        write_frame(&hello_payload("idle-7"), &mut out);
        assert_eq!(
            out,
            [
                0x00, 0x00, 0x00, 0x0A, // length 10
                0x1A, 0x08, // field 3 (hello), length-delimited, 8 bytes
                0x0A, 0x06, // Hello.device_id (field 1), 6 bytes
                b'i', b'd', b'l', b'e', b'-', b'7',
            ]
        );
        let mut reading = Vec::new();
        write_frame(&reading_payload(1_700_000_000_000), &mut reading);
        out.extend_from_slice(&reading);

        let mut buf = BytesMut::from(&out[..]);
        let hello = DevicePayload::decode(read_frame(&mut buf, 1024).unwrap().unwrap()).unwrap();
        assert_eq!(hello, hello_payload("idle-7"));
        let decoded = DevicePayload::decode(read_frame(&mut buf, 1024).unwrap().unwrap()).unwrap();
        let Some(device_payload::Body::Reading(r)) = decoded.body else { panic!("{decoded:?}") };
        assert_eq!((r.device_id.as_str(), r.seq, r.ts_ms), ("", Some(1), Some(1_700_000_000_000)));
        assert_eq!(r.metrics.len(), 1);
        assert!(buf.is_empty());
    }

    #[test]
    fn a_partial_frame_needs_more_bytes_and_is_left_untouched() {
        let mut frame = Vec::new();
        let ack = Ack { seq: Some(1), status: AckStatus::Ok as i32, reason: String::new(), n: 1 };
        frame.put_u32(ack.encoded_len() as u32);
        ack.encode(&mut frame).unwrap();
        for cut in 0..frame.len() {
            let mut buf = BytesMut::from(&frame[..cut]);
            assert!(read_frame(&mut buf, 1024).unwrap().is_none(), "cut at {cut}");
            assert_eq!(buf.len(), cut);
        }
        let mut buf = BytesMut::from(&frame[..]);
        buf.extend_from_slice(&[0x00, 0x00]); // the start of the next frame stays
        let body = read_frame(&mut buf, 1024).unwrap().unwrap();
        let decoded = Ack::decode(body).unwrap();
        assert_eq!(decoded, ack);
        check_ack(&decoded).unwrap();
        assert_eq!(&buf[..], &[0x00, 0x00]);
    }

    #[test]
    fn an_oversized_frame_is_refused_from_its_length_prefix() {
        let mut buf = BytesMut::from(&[0x00, 0x01, 0x00, 0x01][..]); // 65,537 bytes announced
        let err = read_frame(&mut buf, MAX_REPLY_BYTES).unwrap_err();
        assert!(err.to_string().contains("65537"), "{err}");
    }

    #[test]
    fn acks_other_than_ok_for_message_one_seq_one_are_errors() {
        let ok = Ack { seq: Some(1), status: AckStatus::Ok as i32, reason: String::new(), n: 1 };
        check_ack(&ok).unwrap();
        let refused = Ack { status: AckStatus::NotAuthorized as i32, reason: "no".into(), ..ok.clone() };
        let err = check_ack(&refused).unwrap_err().to_string();
        assert!(err.contains("NotAuthorized") && err.contains("no"), "{err}");
        assert!(check_ack(&Ack { n: 2, ..ok.clone() }).is_err());
        assert!(check_ack(&Ack { seq: None, ..ok }).is_err());
    }

    #[test]
    fn mqtt_handshake_packets_round_trip_through_the_shared_codec() {
        let mut out = BytesMut::new();
        mqtt::encode(&Packet::Connect(mqtt_connect("idle-3")), &mut out);
        mqtt::encode(&Packet::Publish(mqtt_publish("idle-3")), &mut out);
        let Some(Packet::Connect(connect)) = mqtt::decode(&mut out, 4096).unwrap() else { panic!() };
        assert_eq!(
            (connect.protocol_level, connect.keep_alive_secs, connect.client_id.as_str()),
            (4, 0, "idle-3")
        );
        let Some(Packet::Publish(publish)) = mqtt::decode(&mut out, 4096).unwrap() else { panic!() };
        assert_eq!((publish.qos, publish.pkid, publish.topic.as_str()), (QoS::AtLeastOnce, 1, "idle/idle-3"));
        let reading: serde_json::Value = serde_json::from_slice(&publish.payload).unwrap();
        assert_eq!((reading["device_id"].as_str(), reading["seq"].as_u64()), (Some("idle-3"), Some(1)));
        assert!(out.is_empty());
    }

    #[test]
    fn proc_fields_are_read_in_bytes() {
        let status =
            "Name:\tweir\nVmPeak:\t  200000 kB\nVmRSS:\t   12345 kB\nRssAnon:\t    8000 kB\nThreads:\t4\n";
        assert_eq!(kib_field(status, "VmRSS"), Some(12_345 * 1024));
        assert_eq!(kib_field(status, "RssAnon"), Some(8000 * 1024));
        assert_eq!(kib_field(status, "Threads"), None); // no unit: not a size
        assert_eq!(kib_field(status, "VmSwap"), None);
        let rollup = "55e0-7ffd ---p 00000000 00:00 0  [rollup]\nRss:               13000 kB\n\
                      Private_Dirty:      9000 kB\nAnonymous:          8100 kB\n\
                      LazyFree:              0 kB\n";
        assert_eq!(kib_field(rollup, "Private_Dirty"), Some(9000 * 1024));
        assert_eq!(kib_field(rollup, "Anonymous"), Some(8100 * 1024));
        assert_eq!(kib_field(rollup, "LazyFree"), Some(0));
    }

    #[test]
    fn this_process_memory_can_be_read() {
        let sample = read_memory(std::process::id()).unwrap();
        assert!(sample.rss > 0 && sample.rss_anon > 0 && sample.rss_anon <= sample.rss, "{sample:?}");
        assert!(matches!(read_memory(u32::MAX), Err(MemoryReadError::Status { .. })));
    }

    #[test]
    fn utc_timestamps() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_timestamp(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(utc_timestamp(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    /// A plan against `target` with a short handshake timeout.
    fn plan(protocol: IdleProtocol, target: SocketAddr, source_addrs: Vec<IpAddr>) -> Arc<Plan> {
        Arc::new(Plan {
            protocol,
            target,
            source_addrs,
            device_prefix: "t".into(),
            handshake_timeout: Duration::from_millis(500),
            skip_message: false,
        })
    }

    /// What a fake listener saw of each connection: the peer's address and the device it named.
    type Seen = Arc<std::sync::Mutex<Vec<(IpAddr, String)>>>;

    /// A raw TCP listener speaking the length-prefixed wire spec: takes a hello and one reading,
    /// answers the reading with an ack of `status`, then holds the connection until the client
    /// closes it.
    async fn fake_tcp_listener(status: AckStatus) -> (SocketAddr, Seen, JoinSet<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Seen::default();
        let mut tasks = JoinSet::new();
        let record = Arc::clone(&seen);
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let (mut stream, peer) = listener.accept().await.unwrap();
                let record = Arc::clone(&record);
                connections.spawn(async move {
                    let mut buf = BytesMut::new();
                    let mut frames = Vec::new();
                    while frames.len() < 2 {
                        match read_frame(&mut buf, 1024).unwrap() {
                            Some(frame) => frames.push(DevicePayload::decode(frame).unwrap()),
                            None => assert_ne!(stream.read_buf(&mut buf).await.unwrap(), 0),
                        }
                    }
                    let Some(device_payload::Body::Hello(hello)) = &frames[0].body else {
                        panic!("{frames:?}")
                    };
                    let Some(device_payload::Body::Reading(reading)) = &frames[1].body else {
                        panic!("{frames:?}")
                    };
                    record.lock().unwrap().push((peer.ip(), hello.device_id.clone()));
                    let ack = Ack { seq: reading.seq, status: status as i32, reason: "fake".into(), n: 1 };
                    let mut out = Vec::new();
                    out.put_u32(ack.encoded_len() as u32);
                    ack.encode(&mut out).unwrap();
                    stream.write_all(&out).await.unwrap();
                    // Idle until the client closes.
                    while stream.read_buf(&mut buf).await.unwrap_or(0) > 0 {}
                });
            }
        });
        (addr, seen, tasks)
    }

    #[tokio::test]
    async fn tcp_connections_send_a_hello_and_a_reading_from_each_source_address() {
        let (addr, seen, _server) = fake_tcp_listener(AckStatus::Ok).await;
        let sources: Vec<IpAddr> = vec!["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()];
        let plan = plan(IdleProtocol::Tcp, addr, sources.clone());
        let open = establish_all(&plan, 10..16, 4).await.unwrap();
        assert_eq!(open.len(), 6);
        assert!(open.iter().all(|c| matches!(c, IdleConnection::Tcp(_)) && c.is_open()));
        let mut seen = seen.lock().unwrap().clone();
        seen.sort_by(|a, b| a.1.cmp(&b.1));
        let expected: Vec<(IpAddr, String)> =
            (10..16).map(|i: u64| (sources[(i % 2) as usize], format!("t-{i}"))).collect();
        assert_eq!(seen, expected);
    }

    #[tokio::test]
    async fn a_refused_reading_fails_the_run_with_weirs_reason() {
        let (addr, _seen, _server) = fake_tcp_listener(AckStatus::NotAuthorized).await;
        let err = establish_all(&plan(IdleProtocol::Tcp, addr, vec![]), 0..3, 3).await.unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("NotAuthorized") && text.contains("fake"), "{text}");
    }

    #[tokio::test]
    async fn ws_connections_upgrade_on_ingest_with_the_device_and_wait_for_the_binary_ack() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Seen::default();
        let record = Arc::clone(&seen);
        let _server = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let (stream, peer) = listener.accept().await.unwrap();
                let record = Arc::clone(&record);
                connections.spawn(async move {
                    let uri = Arc::new(std::sync::Mutex::new(String::new()));
                    let write_uri = Arc::clone(&uri);
                    // The callback's signature is tungstenite's (its error type is an HTTP response).
                    #[allow(clippy::result_large_err)]
                    let callback =
                        move |request: &tokio_tungstenite::tungstenite::handshake::server::Request,
                              response| {
                            *write_uri.lock().unwrap() = request.uri().to_string();
                            Ok(response)
                        };
                    let mut ws = tokio_tungstenite::accept_hdr_async(stream, callback).await.unwrap();
                    let Some(Ok(WsMessage::Binary(bytes))) = ws.next().await else {
                        panic!("no binary message")
                    };
                    let payload = DevicePayload::decode(bytes).unwrap();
                    let Some(device_payload::Body::Reading(reading)) = payload.body else {
                        panic!("{payload:?}")
                    };
                    assert!(reading.device_id.is_empty());
                    record.lock().unwrap().push((peer.ip(), uri.lock().unwrap().clone()));
                    // A ping first: the client must skip it and wait for the ack.
                    ws.send(WsMessage::Ping(Default::default())).await.unwrap();
                    let ack =
                        Ack { seq: reading.seq, status: AckStatus::Ok as i32, reason: String::new(), n: 1 };
                    ws.send(WsMessage::Binary(ack.encode_to_vec().into())).await.unwrap();
                    while let Some(Ok(_)) = ws.next().await {}
                });
            }
        });
        let plan = plan(IdleProtocol::Ws, addr, vec![]);
        let open = establish_all(&plan, 0..5, 2).await.unwrap();
        assert_eq!(open.len(), 5);
        assert!(open.iter().all(|c| matches!(c, IdleConnection::Ws(_)) && c.is_open()));
        let mut uris: Vec<String> = seen.lock().unwrap().iter().map(|(_, uri)| uri.clone()).collect();
        uris.sort();
        let expected: Vec<String> = (0..5).map(|i| format!("/ingest?device=t-{i}")).collect();
        assert_eq!(uris, expected);
    }

    #[tokio::test]
    async fn a_listener_that_never_answers_fails_the_run_within_the_handshake_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts and holds every connection, never writes.
        let _server = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                held.push(listener.accept().await.unwrap().0);
            }
        });
        let started = std::time::Instant::now();
        let err = establish_all(&plan(IdleProtocol::Mqtt, addr, vec![]), 0..1000, 10).await.unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("no CONNACK/PUBACK within the handshake timeout"), "{text}");
        assert!(text.contains("after 0 of 1000"), "{text}");
        // One timeout, not one per connection.
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn nothing_listening_fails_at_once() {
        let addr = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let err = establish_all(&plan(IdleProtocol::Mqtt, addr, vec![]), 0..10, 5).await.unwrap_err();
        assert!(format!("{err:#}").contains("connect failed"), "{err:#}");
    }

    #[tokio::test]
    async fn a_connection_weir_closed_is_no_longer_open() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = connect_from(None, listener.local_addr().unwrap()).await.unwrap();
        let (server_side, _) = listener.accept().await.unwrap();
        let connection = IdleConnection::Tcp(client);
        assert!(connection.is_open());
        drop(server_side);
        let deadline = Instant::now() + Duration::from_secs(2);
        while connection.is_open() {
            assert!(Instant::now() < deadline, "EOF not seen");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn targets_per_protocol() {
        assert_eq!(IdleProtocol::Mqtt.target_bytes(), 2048);
        assert_eq!(IdleProtocol::Tcp.target_bytes(), 2048);
        assert_eq!(IdleProtocol::Ws.target_bytes(), 8192);
    }
}
