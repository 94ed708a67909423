//! `protocol = "mqtt_bridge"`: weir as an MQTT 3.1.1 client of an existing broker. It keeps a
//! persistent session (clean session off, a stable client id), subscribes with QoS 1, and acks
//! each message upstream only after its records are committed, in the order received, so that
//! whatever weir has not stored stays in the broker and is redelivered.
//!
//! The connection task only does I/O and waits; the decisions live in small plain structs:
//! [`AckLedger`] (in-order acks, the in-flight bound), [`Backoff`] (reconnect delays) and
//! [`Keepalive`] (when to ping, when the broker counts as gone). The packets are weir's own MQTT
//! codec, the one the listener uses: reading and writing are separate here, so the bridge can
//! stop reading at its in-flight bound and still write the acks that will let it read again.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;
use weir_proto::{Record, SourceProtocol};
use weir_protocols::mqtt::session::Outcome;
use weir_protocols::mqtt::{
    decode, encode, ConnAck, Connect, ConnectReturnCode, DecodeError, Packet, Publish, QoS, SubAck, Subscribe,
};
use weir_protocols::payload::{self, DecodeContext, PayloadFormat, PayloadLimits};

use super::ingest::now_ms;
use crate::ack::{AckEvent, AckInbox, AckToken};
use crate::config::{AckPoint, BridgeConfig};
use crate::fabric::{message_items, DeadLetter, Fabric, Item, MessageMeta};
use crate::metrics::{Metrics, ProtocolLabel, ProtocolReasonLabel, ReasonLabel};

/// The protocol label of the bridge's metrics.
const LABEL: &str = "mqtt_bridge";

/// Time the broker has to accept the TCP connection and answer CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Shortest time a write to the broker may take before the connection counts as dead (the
/// keepalive interval is used when it is longer).
const MIN_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 16 * 1024;

/// Packet id of the bridge's SUBSCRIBE. The bridge never publishes, so no other id of its own
/// is ever in use.
const SUBSCRIBE_PKID: u16 = 1;

/// Runs one bridge until `shutdown`: connects, subscribes, ingests, and reconnects with backoff
/// whenever the connection ends. On shutdown it stops reading, waits for the commits of the
/// messages it took, sends their acks, and disconnects.
pub async fn run(
    config: BridgeConfig,
    fabric: Fabric,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) {
    let span = tracing::info_span!("bridge", broker = %config.broker, client_id = %config.client_id);
    Bridge::new(config, fabric, metrics).run(shutdown).instrument(span).await;
}

/// What one bridge's connections share.
struct Bridge {
    config: BridgeConfig,
    fabric: Fabric,
    metrics: Arc<Metrics>,
    format: PayloadFormat,
    /// Per-message counter, looked up once.
    messages_received: Counter,
}

impl Bridge {
    fn new(config: BridgeConfig, fabric: Fabric, metrics: Arc<Metrics>) -> Self {
        let messages_received =
            metrics.messages_received.get_or_create(&ProtocolLabel { protocol: LABEL }).clone();
        let format = PayloadFormat::from(config.payload);
        Self { config, fabric, metrics, format, messages_received }
    }

    fn count_error(&self, reason: &'static str) {
        self.metrics.protocol_errors.get_or_create(&ProtocolReasonLabel { protocol: LABEL, reason }).inc();
    }

    async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(
            Duration::from_millis(self.config.reconnect_min_ms),
            Duration::from_millis(self.config.reconnect_max_ms),
        );
        // Subscribing again replaces a subscription and makes the broker resend its retained
        // messages, so it is done on the first connection (the filters may have changed since
        // the session was made) and afterwards only when the broker lost the session.
        let mut subscribed = false;
        loop {
            let opened = tokio::select! {
                opened = self.open() => opened,
                _ = crate::shutdown::signalled(&mut shutdown) => return,
            };
            let delay = match opened {
                Ok((stream, leftover, session_present)) => {
                    let subscribe = !subscribed || !session_present;
                    let started = Instant::now();
                    let (end, confirmed) =
                        self.serve(stream, leftover, session_present, subscribe, shutdown.clone()).await;
                    if end == End::Shutdown || *shutdown.borrow() {
                        return;
                    }
                    if subscribe {
                        // Unconfirmed (the connection ended before the SUBACK): ask again.
                        subscribed = confirmed;
                    }
                    // A connection that held for a whole maximum backoff was healthy: the
                    // failures before it do not count any more. A short one does not reset it,
                    // so a broker that accepts and drops at once is not hammered.
                    if started.elapsed() >= backoff.max {
                        backoff.reset();
                    }
                    let delay = backoff.next_delay(jitter());
                    if end.is_notable() {
                        tracing::warn!(
                            reason = end.label(),
                            retry_in_ms = delay.as_millis() as u64,
                            "connection to the broker ended; reconnecting"
                        );
                    } else {
                        tracing::info!(
                            reason = end.label(),
                            retry_in_ms = delay.as_millis() as u64,
                            "connection to the broker ended; reconnecting"
                        );
                    }
                    delay
                }
                Err(error) => {
                    self.count_error(error.reason());
                    let delay = backoff.next_delay(jitter());
                    tracing::warn!(
                        %error,
                        failures = backoff.failures(),
                        retry_in_ms = delay.as_millis() as u64,
                        "cannot connect to the broker; retrying"
                    );
                    delay
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = crate::shutdown::signalled(&mut shutdown) => return,
            }
        }
    }

    /// Connects and completes CONNECT/CONNACK. Returns the stream, bytes the broker sent after
    /// the CONNACK (a resumed session may start delivering at once) and whether the broker kept
    /// the session.
    async fn open(&self) -> Result<(TcpStream, BytesMut, bool), ConnectError> {
        let config = &self.config;
        let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(config.broker.as_str()))
            .await
            .map_err(|_| ConnectError::Timeout)?
            .map_err(ConnectError::Unreachable)?;
        let _ = stream.set_nodelay(true);
        let connect = Packet::Connect(Connect {
            protocol_level: 4,
            clean_session: false,
            keep_alive_secs: config.keepalive_s.min(u64::from(u16::MAX)) as u16,
            client_id: config.client_id.clone(),
            will: None,
            // MQTT 3.1.1 has no password without a user name; an empty name carries it.
            username: config.username.clone().or_else(|| config.password.as_ref().map(|_| String::new())),
            password: config.password.as_ref().map(|p| Bytes::from(p.clone().into_bytes())),
        });
        let mut out = BytesMut::new();
        encode(&connect, &mut out);
        let mut buf = BytesMut::new();
        let connack = tokio::time::timeout(CONNECT_TIMEOUT, async {
            stream.write_all(&out).await.map_err(ConnectError::Unreachable)?;
            loop {
                match decode(&mut buf, config.max_packet_bytes) {
                    Ok(Some(Packet::ConnAck(connack))) => return Ok(connack),
                    Ok(Some(other)) => {
                        return Err(ConnectError::Protocol(format!("expected CONNACK, got {other:?}")))
                    }
                    Ok(None) => {}
                    Err(error) => return Err(ConnectError::Protocol(error.to_string())),
                }
                buf.reserve(READ_CHUNK);
                match stream.read_buf(&mut buf).await {
                    Ok(0) => return Err(ConnectError::Closed),
                    Ok(_) => {}
                    Err(error) => return Err(ConnectError::Unreachable(error)),
                }
            }
        })
        .await
        .map_err(|_| ConnectError::Timeout)??;
        let ConnAck { session_present, code } = connack;
        if code != ConnectReturnCode::Accepted {
            return Err(ConnectError::Refused(code));
        }
        Ok((stream, buf, session_present))
    }

    async fn serve(
        &self,
        stream: TcpStream,
        leftover: BytesMut,
        session_present: bool,
        subscribe: bool,
        shutdown: watch::Receiver<bool>,
    ) -> (End, bool) {
        let label = ProtocolLabel { protocol: LABEL };
        self.metrics.connections_opened.get_or_create(&label).inc();
        self.metrics.connections_active.get_or_create(&label).inc();
        tracing::info!(session_present, subscribe, "connected to the broker");
        let max_inflight = self.config.max_inflight;
        let keepalive = Duration::from_secs(self.config.keepalive_s);
        let mut connection = Connection {
            bridge: self,
            stream,
            buf: leftover,
            out: BytesMut::new(),
            ledger: AckLedger::new(max_inflight),
            inbox: AckInbox::new(),
            keepalive: Keepalive::new(keepalive, Instant::now()),
            write_timeout: keepalive.max(MIN_WRITE_TIMEOUT),
            awaiting_suback: None,
            subscribed: false,
            skipping: 0,
            records: Vec::new(),
            released: Vec::new(),
        };
        if subscribe {
            connection.subscribe();
        }
        let end = connection.run(shutdown).await;
        let _ = connection.stream.shutdown().await;
        let subscribed = connection.subscribed;
        self.metrics.connections_active.get_or_create(&label).dec();
        self.metrics
            .connections_closed
            .get_or_create(&ProtocolReasonLabel { protocol: LABEL, reason: end.label() })
            .inc();
        (end, subscribed)
    }
}

/// Why connecting failed; each is counted in `weir_protocol_errors_total` under its reason.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("broker unreachable: {0}")]
    Unreachable(std::io::Error),
    #[error("no CONNACK within {CONNECT_TIMEOUT:?}")]
    Timeout,
    #[error("broker closed the connection before CONNACK")]
    Closed,
    #[error("broker refused the connection: {0:?}")]
    Refused(ConnectReturnCode),
    #[error("broker broke the protocol: {0}")]
    Protocol(String),
}

impl ConnectError {
    fn reason(&self) -> &'static str {
        match self {
            ConnectError::Unreachable(_) | ConnectError::Closed => "connect_failed",
            ConnectError::Timeout => "connect_timeout",
            ConnectError::Refused(_) => "connect_refused",
            ConnectError::Protocol(_) => "malformed_packet",
        }
    }
}

/// Why a connection to the broker ended; the label of `weir_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Shutdown: every taken message was answered and the bridge disconnected cleanly.
    Shutdown,
    BrokerClosed,
    Io,
    KeepaliveTimeout,
    ProtocolError,
    /// A message was not stored: no ack for it (nor anything after it); the broker redelivers.
    StoreFailed,
    SubscriptionRefused,
    /// The fabric closed under the bridge (the gateway is stopping).
    FabricClosed,
}

impl End {
    fn label(self) -> &'static str {
        match self {
            End::Shutdown => "shutdown",
            End::BrokerClosed => "peer_closed",
            End::Io => "io_error",
            End::KeepaliveTimeout => "keepalive_timeout",
            End::ProtocolError => "protocol_error",
            End::StoreFailed => "store_failed",
            End::SubscriptionRefused => "subscription_refused",
            End::FabricClosed => "fabric_closed",
        }
    }

    /// Whether the end deserves a warning (the broker or the sink is in trouble).
    fn is_notable(self) -> bool {
        !matches!(self, End::Shutdown | End::FabricClosed)
    }
}

/// One connection to the broker.
struct Connection<'a> {
    bridge: &'a Bridge,
    stream: TcpStream,
    /// Bytes read and not yet decoded.
    buf: BytesMut,
    /// Packets encoded and not yet written.
    out: BytesMut,
    ledger: AckLedger,
    /// Outcome reports of the messages in flight.
    inbox: Arc<AckInbox>,
    keepalive: Keepalive,
    write_timeout: Duration,
    awaiting_suback: Option<u16>,
    /// The broker confirmed this connection's SUBSCRIBE.
    subscribed: bool,
    /// Bytes of an oversized PUBLISH still to discard as they arrive.
    skipping: usize,
    /// Scratch space for one message's records, reused.
    records: Vec<Record>,
    /// Scratch space for released packet ids, reused.
    released: Vec<u16>,
}

impl Connection<'_> {
    fn subscribe(&mut self) {
        let filters = self.bridge.config.filters.iter().map(|f| (f.clone(), QoS::AtLeastOnce)).collect();
        encode(&Packet::Subscribe(Subscribe { pkid: SUBSCRIBE_PKID, filters }), &mut self.out);
        self.awaiting_suback = Some(SUBSCRIBE_PKID);
    }

    async fn run(&mut self, mut shutdown: watch::Receiver<bool>) -> End {
        let max_packet = self.bridge.config.max_packet_bytes;
        let mut stopping = false;
        let mut was_reading = true;
        loop {
            // Take what is buffered while the ledger has room; the rest waits in the socket,
            // which is the backpressure the broker sees.
            let mut starved = false;
            while !stopping && self.ledger.can_take() {
                if !self.discard_skipped() {
                    starved = true;
                    break;
                }
                match decode(&mut self.buf, max_packet) {
                    Ok(Some(packet)) => {
                        if let Err(end) = self.on_packet(packet).await {
                            return end;
                        }
                    }
                    Ok(None) => {
                        starved = true;
                        break;
                    }
                    Err(DecodeError::PacketTooLarge { size, max }) => match self.oversized(size, max).await {
                        Ok(true) => {}
                        Ok(false) => {
                            starved = true;
                            break;
                        }
                        Err(end) => return end,
                    },
                    Err(error) => {
                        tracing::warn!(%error, "malformed packet from the broker");
                        self.bridge.count_error("malformed_packet");
                        return End::ProtocolError;
                    }
                }
            }
            if let Err(end) = self.release_and_flush().await {
                return end;
            }
            if !starved && !stopping && self.ledger.can_take() {
                // Stopped at the bound with packets still buffered, and acks made room.
                continue;
            }
            if stopping && self.ledger.in_flight() == 0 {
                encode(&Packet::Disconnect, &mut self.out);
                let _ = self.flush().await;
                return End::Shutdown;
            }
            let reading = !stopping && self.ledger.can_take();
            if reading && !was_reading {
                self.keepalive.on_resume(Instant::now());
            }
            was_reading = reading;
            if reading {
                self.buf.reserve(READ_CHUNK);
            }
            let ping_due = self.keepalive.ping_due();
            let dead_at = self.keepalive.dead_at();
            tokio::select! {
                read = self.stream.read_buf(&mut self.buf), if reading => match read {
                    Ok(0) => return End::BrokerClosed,
                    Ok(_) => self.keepalive.on_received(),
                    Err(error) => {
                        tracing::debug!(%error, "read failed");
                        return End::Io;
                    }
                },
                event = self.inbox.next() => self.apply(event),
                _ = sleep_until_some(ping_due) => self.ping(),
                _ = sleep_until_some(dead_at), if reading => {
                    self.bridge.count_error("keepalive_timeout");
                    return End::KeepaliveTimeout;
                },
                _ = crate::shutdown::signalled(&mut shutdown), if !stopping => {
                    stopping = true;
                    tracing::info!(in_flight = self.ledger.in_flight(), "stopping: answering the messages taken, then disconnecting");
                },
            }
        }
    }

    async fn on_packet(&mut self, packet: Packet) -> Result<(), End> {
        match packet {
            Packet::Publish(publish) => self.on_publish(publish).await,
            Packet::SubAck(suback) => self.on_suback(suback),
            Packet::PingResp => Ok(()),
            // Answers to packets the bridge never sends: harmless, ignored.
            Packet::PubAck(_) | Packet::PubComp(_) | Packet::PubRec(_) | Packet::UnsubAck(_) => {
                tracing::debug!(?packet, "ignoring an unsolicited acknowledgement from the broker");
                Ok(())
            }
            other => {
                tracing::warn!(packet = ?other, "unexpected packet from the broker");
                self.bridge.count_error("unexpected_packet");
                Err(End::ProtocolError)
            }
        }
    }

    fn on_suback(&mut self, suback: SubAck) -> Result<(), End> {
        if self.awaiting_suback != Some(suback.pkid) {
            tracing::debug!(pkid = suback.pkid, "ignoring a SUBACK for no subscription of ours");
            return Ok(());
        }
        self.awaiting_suback = None;
        let filters = &self.bridge.config.filters;
        let mut refused = false;
        for (filter, code) in filters.iter().zip(suback.return_codes.iter().copied()) {
            match code {
                0x80 => {
                    tracing::error!(filter, "the broker refused the subscription (check its ACL)");
                    refused = true;
                }
                0 => tracing::warn!(filter, "the broker granted QoS 0 only: messages on this filter are not redelivered if weir fails"),
                _ => tracing::debug!(filter, qos = code, "subscribed"),
            }
        }
        if suback.return_codes.len() != filters.len() {
            tracing::warn!(
                expected = filters.len(),
                got = suback.return_codes.len(),
                "SUBACK does not answer every filter"
            );
            self.bridge.count_error("malformed_packet");
            return Err(End::ProtocolError);
        }
        if refused {
            self.bridge.count_error("subscription_refused");
            return Err(End::SubscriptionRefused);
        }
        tracing::info!(filters = ?filters, "subscribed");
        self.subscribed = true;
        Ok(())
    }

    /// Decodes one message and enqueues its records (or its dead letter), awaiting room in the
    /// fabric while still writing acks for earlier messages.
    async fn on_publish(&mut self, publish: Publish) -> Result<(), End> {
        let Publish { qos, topic, pkid, payload, .. } = publish;
        let pkid = match qos {
            QoS::AtMostOnce => None,
            QoS::AtLeastOnce => Some(pkid),
            QoS::ExactlyOnce => {
                // The subscription asked for QoS 1; the broker must downgrade (§3.8.4).
                tracing::warn!(topic, "the broker sent QoS 2 on a QoS 1 subscription");
                self.bridge.count_error("unexpected_qos");
                return Err(End::ProtocolError);
            }
        };
        let bridge = self.bridge;
        bridge.messages_received.inc();
        let id = self.ledger.take(pkid);
        let tracked = bridge.config.ack != AckPoint::Received;
        let token = AckToken::for_point(bridge.config.ack, id, &self.inbox);
        let device_id = device_from_topic(&topic, bridge.config.device_id_topic_level);
        let received_ts_ms = now_ms();
        let decoded = {
            let ctx = DecodeContext {
                fallback_device_id: device_id,
                protocol: SourceProtocol::MqttBridge,
                source: &topic,
                received_ts_ms,
                keep_raw: bridge.config.keep_raw,
                limits: PayloadLimits::default(),
            };
            payload::decode(bridge.format, &payload, &ctx, &mut self.records)
        };
        let mut items = Vec::new();
        let meta = MessageMeta::new(&payload, bridge.format);
        match decoded {
            Ok(()) => {
                bridge.metrics.records_decoded.inc_by(self.records.len() as u64);
                message_items(&mut self.records, token, meta, &mut items);
            }
            Err(error) => {
                bridge
                    .metrics
                    .records_dead_lettered
                    .get_or_create(&ReasonLabel { reason: "undecodable" })
                    .inc();
                bridge.count_error("undecodable");
                if crate::logs::DEAD_LETTERS.allow() {
                    tracing::warn!(%error, device = device_id, topic, "payload not decodable; dead-lettered");
                }
                let letter = DeadLetter {
                    device_id: device_id.to_owned(),
                    protocol: SourceProtocol::MqttBridge,
                    source: topic.clone(),
                    error: error.to_string(),
                    raw: payload,
                    received_ts_ms,
                };
                items.push(Item::dead_letter(letter, token).of_message(meta));
            }
        }
        self.enqueue_all(id, items, tracked).await
    }

    /// A PUBLISH larger than `max_packet_bytes`: it is never buffered. Its topic and packet id
    /// are read from the front, a dead letter without the payload records it, and its bytes
    /// are discarded as they arrive; once that dead letter is committed the message is acked,
    /// so one oversized message cannot wedge the bridge in a redelivery loop. Returns false
    /// when more bytes are needed to read the topic.
    async fn oversized(&mut self, size: usize, max: usize) -> Result<bool, End> {
        let Some(head) = oversized_publish_head(&self.buf) else {
            tracing::warn!(size, max, "oversized packet from the broker that is not a PUBLISH");
            self.bridge.count_error("packet_too_large");
            return Err(End::ProtocolError);
        };
        let (topic, pkid) = match head {
            PublishHead::Incomplete => return Ok(false),
            PublishHead::Malformed => {
                self.bridge.count_error("malformed_packet");
                return Err(End::ProtocolError);
            }
            PublishHead::Complete { topic, pkid } => (topic, pkid),
        };
        let bridge = self.bridge;
        bridge.messages_received.inc();
        bridge.count_error("packet_too_large");
        bridge.metrics.records_dead_lettered.get_or_create(&ReasonLabel { reason: "too_large" }).inc();
        tracing::warn!(
            topic,
            size,
            max,
            "message larger than max_packet_bytes: dead-lettered without its payload"
        );
        let id = self.ledger.take(pkid);
        let tracked = bridge.config.ack != AckPoint::Received;
        let token = AckToken::for_point(bridge.config.ack, id, &self.inbox);
        let letter = DeadLetter {
            device_id: device_from_topic(&topic, bridge.config.device_id_topic_level).to_owned(),
            protocol: SourceProtocol::MqttBridge,
            error: format!("message of {size} bytes exceeds max_packet_bytes ({max}); payload not kept"),
            source: topic,
            raw: Bytes::new(),
            received_ts_ms: now_ms(),
        };
        self.skipping = size;
        self.discard_skipped();
        // Its format is unknown (never read): `Auto` leaves the device's last known format.
        let meta =
            MessageMeta { bytes: u32::try_from(size).unwrap_or(u32::MAX), format: PayloadFormat::Auto };
        self.enqueue_all(id, vec![Item::dead_letter(letter, token).of_message(meta)], tracked).await?;
        Ok(true)
    }

    /// Drops buffered bytes of an oversized packet; true once none are left to skip.
    fn discard_skipped(&mut self) -> bool {
        let n = self.skipping.min(self.buf.len());
        self.buf.advance(n);
        self.skipping -= n;
        self.skipping == 0
    }

    async fn enqueue_all(&mut self, id: u64, items: Vec<Item>, tracked: bool) -> Result<(), End> {
        let mut outcome = Outcome::Stored;
        for item in items {
            match self.enqueue(item).await? {
                Outcome::Stored => {}
                other => outcome = other,
            }
        }
        if !tracked {
            // `ack = "received"`: acknowledged once the message is in the fabric.
            self.ledger.complete(id, outcome);
        }
        Ok(())
    }

    /// Sends one item into the fabric, writing acks and pings while it waits for room.
    async fn enqueue(&mut self, item: Item) -> Result<Outcome, End> {
        let fabric = self.bridge.fabric.clone();
        let send = fabric.send(item);
        tokio::pin!(send);
        loop {
            let ping_due = self.keepalive.ping_due();
            tokio::select! {
                sent = &mut send => return fabric.settle_send(sent).map_err(|_| End::FabricClosed),
                event = self.inbox.next() => {
                    self.apply(event);
                    self.release_and_flush().await?;
                }
                _ = sleep_until_some(ping_due) => {
                    self.ping();
                    self.flush().await?;
                }
            }
        }
    }

    /// Records an outcome report, and every other one already waiting.
    fn apply(&mut self, (id, outcome): AckEvent) {
        self.ledger.complete(id, outcome);
        while let Some((id, outcome)) = self.inbox.try_next() {
            self.ledger.complete(id, outcome);
        }
    }

    /// Writes the acks now due, in receive order. A message that was not stored ends the
    /// connection after the acks before it are written: the broker redelivers it and the rest.
    async fn release_and_flush(&mut self) -> Result<(), End> {
        let released = self.ledger.release(&mut self.released);
        for pkid in self.released.drain(..) {
            encode(&Packet::PubAck(pkid), &mut self.out);
        }
        self.flush().await?;
        released.map_err(|NotStored| {
            tracing::warn!("a message was not stored; closing without its ack so the broker redelivers it");
            End::StoreFailed
        })
    }

    fn ping(&mut self) {
        encode(&Packet::PingReq, &mut self.out);
        self.keepalive.on_ping_sent(Instant::now());
    }

    async fn flush(&mut self) -> Result<(), End> {
        if self.out.is_empty() {
            return Ok(());
        }
        let written = tokio::time::timeout(self.write_timeout, self.stream.write_all(&self.out)).await;
        self.out.clear();
        match written {
            Ok(Ok(())) => {
                self.keepalive.on_sent(Instant::now());
                Ok(())
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, "write failed");
                Err(End::Io)
            }
            Err(_) => {
                tracing::warn!(timeout = ?self.write_timeout, "the broker stopped reading");
                Err(End::Io)
            }
        }
    }
}

/// The device id when the payload names none: topic level `level` (0-based) if configured and
/// present and not empty, else the whole topic.
fn device_from_topic(topic: &str, level: Option<usize>) -> &str {
    level.and_then(|l| topic.split('/').nth(l)).filter(|s| !s.is_empty()).unwrap_or(topic)
}

/// What the front of an oversized PUBLISH says.
#[derive(Debug, PartialEq, Eq)]
enum PublishHead {
    Incomplete,
    Malformed,
    Complete { topic: String, pkid: Option<u16> },
}

/// Reads the topic and packet id of the PUBLISH at the front of `buf`; `None` when the packet
/// there is not a PUBLISH. Only the fixed header, topic and packet id need to be buffered.
fn oversized_publish_head(buf: &[u8]) -> Option<PublishHead> {
    let first = *buf.first()?;
    if first >> 4 != 3 {
        return None;
    }
    let qos = (first >> 1) & 0b11;
    // The remaining length: 1 to 4 bytes, 7 bits each (the decoder already checked its form).
    let mut header_len = 1;
    loop {
        let Some(byte) = buf.get(header_len) else { return Some(PublishHead::Incomplete) };
        header_len += 1;
        if byte & 0x80 == 0 || header_len > 4 {
            break;
        }
    }
    let body = &buf[header_len..];
    let Some(len) = body.get(..2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]]))) else {
        return Some(PublishHead::Incomplete);
    };
    let id_len = if qos > 0 { 2 } else { 0 };
    let Some(rest) = body.get(2..2 + len + id_len) else { return Some(PublishHead::Incomplete) };
    let Ok(topic) = std::str::from_utf8(&rest[..len]) else { return Some(PublishHead::Malformed) };
    let pkid = (qos > 0).then(|| u16::from_be_bytes([rest[len], rest[len + 1]]));
    if qos > 1 || pkid == Some(0) || topic.is_empty() {
        return Some(PublishHead::Malformed);
    }
    Some(PublishHead::Complete { topic: topic.to_owned(), pkid })
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// A uniformly distributed number in [0, 1) for the backoff jitter. Each `RandomState` is
/// seeded afresh, which is all the randomness reconnect jitter needs.
fn jitter() -> f64 {
    let bits = RandomState::new().build_hasher().finish() >> 11;
    bits as f64 / (1u64 << 53) as f64
}

/// The message at the front of the ledger was not stored (the sink failed, or shutdown came
/// before its commit): it must not be acked, nor anything after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a message was not stored")]
pub struct NotStored;

/// The bridge's messages taken from the broker and not yet acknowledged, in receive order.
///
/// Per-device shards commit out of order; acks leave in receive order, so an ack never
/// overtakes an earlier message that may still fail. At `max_inflight` the connection stops
/// taking messages (stops reading the socket) until acks release room.
#[derive(Debug)]
pub struct AckLedger {
    max_inflight: usize,
    /// Id of the front entry; entries have consecutive ids.
    front_id: u64,
    entries: VecDeque<Entry>,
}

#[derive(Debug)]
struct Entry {
    /// `None` for a QoS 0 message: in order like the rest, but nothing to ack.
    pkid: Option<u16>,
    outcome: Option<Outcome>,
}

impl AckLedger {
    /// A ledger that lets at most `max_inflight` messages await their ack.
    pub fn new(max_inflight: usize) -> Self {
        Self { max_inflight, front_id: 1, entries: VecDeque::new() }
    }

    /// Whether another message may be taken from the broker.
    pub fn can_take(&self) -> bool {
        self.entries.len() < self.max_inflight
    }

    /// Messages taken and not yet released.
    pub fn in_flight(&self) -> usize {
        self.entries.len()
    }

    /// Takes a message with packet id `pkid` (`None` for QoS 0); returns the id its outcome is
    /// reported under.
    pub fn take(&mut self, pkid: Option<u16>) -> u64 {
        self.entries.push_back(Entry { pkid, outcome: None });
        self.front_id + self.entries.len() as u64 - 1
    }

    /// Records the outcome of message `id`; ids not in flight are ignored.
    pub fn complete(&mut self, id: u64, outcome: Outcome) {
        let Some(index) = id.checked_sub(self.front_id) else { return };
        if let Some(entry) = usize::try_from(index).ok().and_then(|i| self.entries.get_mut(i)) {
            entry.outcome = Some(outcome);
        }
    }

    /// Moves the packet ids due for an ack into `acks`, in receive order, up to the first
    /// message still waiting for its outcome. A stored or dead-lettered message is acked; one
    /// dropped under `when_full = "drop_newest"` is acked too (the operator chose to shed it,
    /// and it is counted), as the MQTT listener does. A message that was not stored stops the
    /// release with [`NotStored`]; it stays at the front, so nothing after it is ever acked.
    pub fn release(&mut self, acks: &mut Vec<u16>) -> Result<(), NotStored> {
        while let Some(entry) = self.entries.front() {
            match entry.outcome {
                None => break,
                Some(Outcome::Failed) => return Err(NotStored),
                Some(Outcome::Stored | Outcome::Dropped) => {
                    acks.extend(entry.pkid);
                    self.entries.pop_front();
                    self.front_id += 1;
                }
            }
        }
        Ok(())
    }
}

/// Reconnect delays: exponential, with full jitter between the minimum and the current cap.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// Delays between `min` and `max` (a `max` below `min` is taken as `min`).
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { min, max: max.max(min), failures: 0 }
    }

    /// The wait before the next attempt: uniform in `[min, min(max, min·2^failures)]`, with
    /// `unit` in [0, 1) choosing the point. Counts one more failure.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let cap = self.min.saturating_mul(1u32 << self.failures.min(20)).min(self.max);
        self.failures = self.failures.saturating_add(1);
        self.min + (cap - self.min).mul_f64(unit.clamp(0.0, 1.0))
    }

    /// Attempts that failed since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// After a healthy connection: the next delay is the minimum again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// The client side of MQTT keepalive: send something at least every interval (a PINGREQ when
/// there is nothing else), and count the broker as gone when a ping has gone unanswered for an
/// interval while the bridge was reading. While it is paused at its in-flight bound it does
/// not read, so the answer may be waiting unread in the socket; the wait restarts on resume.
#[derive(Debug)]
pub struct Keepalive {
    /// `None`: keepalive 0, no pings and no timeout.
    interval: Option<Duration>,
    last_sent: Instant,
    /// When the oldest ping without an answer since was sent (or reading resumed).
    unanswered_since: Option<Instant>,
}

impl Keepalive {
    /// Keepalive with `interval` (zero: off), counting from `now`.
    pub fn new(interval: Duration, now: Instant) -> Self {
        Self { interval: (!interval.is_zero()).then_some(interval), last_sent: now, unanswered_since: None }
    }

    /// When a PINGREQ is due if nothing else is written before.
    pub fn ping_due(&self) -> Option<Instant> {
        Some(self.last_sent + self.interval?)
    }

    /// When the broker counts as gone if nothing arrives before.
    pub fn dead_at(&self) -> Option<Instant> {
        Some(self.unanswered_since? + self.interval?)
    }

    /// Something was written to the broker.
    pub fn on_sent(&mut self, now: Instant) {
        self.last_sent = now;
    }

    /// A PINGREQ was queued for writing.
    pub fn on_ping_sent(&mut self, now: Instant) {
        self.last_sent = now;
        self.unanswered_since.get_or_insert(now);
    }

    /// Something arrived from the broker: it is alive.
    pub fn on_received(&mut self) {
        self.unanswered_since = None;
    }

    /// Reading resumed after a pause: give an outstanding ping's answer a full interval.
    pub fn on_resume(&mut self, now: Instant) {
        if let Some(since) = &mut self.unanswered_since {
            *since = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_order_completions_release_acks_in_receive_order() {
        let mut ledger = AckLedger::new(8);
        let a = ledger.take(Some(10));
        let b = ledger.take(None); // QoS 0: in order, nothing to ack
        let c = ledger.take(Some(12));
        let d = ledger.take(Some(13));
        let mut acks = Vec::new();
        ledger.complete(d, Outcome::Stored);
        ledger.complete(b, Outcome::Stored);
        ledger.release(&mut acks).unwrap();
        assert!(acks.is_empty(), "nothing is acked before the first message's commit");
        ledger.complete(a, Outcome::Stored);
        ledger.release(&mut acks).unwrap();
        assert_eq!(acks, [10], "the first message, then the wait for the third");
        assert_eq!(ledger.in_flight(), 2);
        ledger.complete(c, Outcome::Dropped);
        ledger.release(&mut acks).unwrap();
        assert_eq!(acks, [10, 12, 13]);
        assert_eq!(ledger.in_flight(), 0);
    }

    #[test]
    fn a_failed_message_is_never_acked_nor_anything_after_it() {
        let mut ledger = AckLedger::new(8);
        let a = ledger.take(Some(1));
        let b = ledger.take(Some(2));
        let c = ledger.take(Some(3));
        ledger.complete(a, Outcome::Stored);
        ledger.complete(c, Outcome::Stored);
        ledger.complete(b, Outcome::Failed);
        let mut acks = Vec::new();
        assert_eq!(ledger.release(&mut acks), Err(NotStored));
        assert_eq!(acks, [1], "the commit before the failure is acked");
        assert_eq!(ledger.release(&mut acks), Err(NotStored), "and the failure stays in the way");
        assert_eq!(acks, [1]);
        assert_eq!(ledger.in_flight(), 2);
    }

    #[test]
    fn the_bound_counts_messages_until_their_ack_is_released() {
        let mut ledger = AckLedger::new(2);
        let a = ledger.take(Some(1));
        let b = ledger.take(Some(2));
        assert!(!ledger.can_take());
        ledger.complete(b, Outcome::Stored);
        let mut acks = Vec::new();
        ledger.release(&mut acks).unwrap();
        assert!(!ledger.can_take(), "a completed message behind a waiting one still counts");
        ledger.complete(a, Outcome::Stored);
        ledger.release(&mut acks).unwrap();
        assert!(ledger.can_take());
        // Stale and unknown ids are ignored.
        ledger.complete(a, Outcome::Failed);
        ledger.complete(99, Outcome::Failed);
        let c = ledger.take(Some(3));
        assert_eq!(c, 3);
        ledger.complete(c, Outcome::Stored);
        ledger.release(&mut acks).unwrap();
        assert_eq!(acks, [1, 2, 3]);
    }

    #[test]
    fn backoff_grows_exponentially_within_its_bounds_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        // The top of the jitter range doubles per failure up to the maximum.
        let tops: Vec<u64> = (0..6).map(|_| backoff.next_delay(0.999_999).as_millis() as u64).collect();
        assert_eq!(tops, [100, 199, 399, 799, 999, 999]);
        assert_eq!(backoff.failures(), 6);
        // The bottom is always the minimum.
        assert_eq!(backoff.next_delay(0.0), Duration::from_millis(100));
        backoff.reset();
        assert_eq!(
            backoff.next_delay(0.5),
            Duration::from_millis(100),
            "first retry after a reset: the minimum"
        );
        assert_eq!(backoff.next_delay(0.5), Duration::from_millis(150));
    }

    #[test]
    fn jitter_is_in_the_unit_interval_and_varies() {
        let samples: Vec<f64> = (0..64).map(|_| jitter()).collect();
        assert!(samples.iter().all(|u| (0.0..1.0).contains(u)));
        let first = samples[0];
        assert!(samples.iter().any(|u| *u != first), "jitter never changes");
    }

    #[test]
    fn keepalive_pings_when_idle_and_times_out_only_while_reading() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut k = Keepalive::new(10 * s, t0);
        assert_eq!(k.ping_due(), Some(t0 + 10 * s));
        assert_eq!(k.dead_at(), None);
        k.on_sent(t0 + 4 * s); // an ack counts as activity
        assert_eq!(k.ping_due(), Some(t0 + 14 * s));
        k.on_ping_sent(t0 + 14 * s);
        assert_eq!(k.dead_at(), Some(t0 + 24 * s));
        // A second ping (paused, nothing read) keeps the first one's deadline.
        k.on_ping_sent(t0 + 24 * s);
        assert_eq!(k.ping_due(), Some(t0 + 34 * s));
        assert_eq!(k.dead_at(), Some(t0 + 24 * s));
        // Reading resumes: the answer may be unread; it gets a full interval from now.
        k.on_resume(t0 + 30 * s);
        assert_eq!(k.dead_at(), Some(t0 + 40 * s));
        k.on_received();
        assert_eq!(k.dead_at(), None);
        let off = Keepalive::new(Duration::ZERO, t0);
        assert_eq!((off.ping_due(), off.dead_at()), (None, None));
    }

    #[test]
    fn device_id_comes_from_the_topic_level_or_the_whole_topic() {
        assert_eq!(device_from_topic("site/a/dev-7/telemetry", Some(2)), "dev-7");
        assert_eq!(device_from_topic("site/a/dev-7/telemetry", None), "site/a/dev-7/telemetry");
        assert_eq!(device_from_topic("short", Some(2)), "short", "missing level: whole topic");
        assert_eq!(device_from_topic("a//b", Some(1)), "a//b", "empty level: whole topic");
    }

    #[test]
    fn oversized_publish_head_reads_topic_and_packet_id() {
        // PUBLISH QoS 1, remaining length 2_000_000 (3 bytes), topic "t/d1", packet id 7.
        let mut bytes = vec![0x32, 0x80, 0x89, 0x7a, 0x00, 0x04, b't', b'/', b'd', b'1', 0x00, 0x07];
        assert_eq!(
            oversized_publish_head(&bytes),
            Some(PublishHead::Complete { topic: "t/d1".into(), pkid: Some(7) })
        );
        for cut in 1..bytes.len() {
            assert_eq!(oversized_publish_head(&bytes[..cut]), Some(PublishHead::Incomplete), "cut at {cut}");
        }
        bytes[0] = 0x30; // QoS 0: no packet id
        assert_eq!(
            oversized_publish_head(&bytes[..10]),
            Some(PublishHead::Complete { topic: "t/d1".into(), pkid: None })
        );
        bytes[0] = 0x90; // SUBACK
        assert_eq!(oversized_publish_head(&bytes), None);
    }
}
