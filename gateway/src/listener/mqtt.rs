//! The MQTT connection task (3.1, 3.1.1 and 5 on one listener): reads packets, drives the pure
//! [`Session`], decodes payloads into records, enqueues them (awaiting room: backpressure), and
//! writes acks as commits complete. MQTT 3.1.1 devices are held back by not reading them once
//! `max_inflight` messages await their ack; MQTT 5 devices by their Receive Maximum, while weir
//! keeps reading them (so PINGREQ is answered).
//!
//! A CONNECT is answered once the listener's authentication (if any) and then [`Sessions`]
//! decided it: for a persistent session, after its record is durable (Session Present = 1 when
//! a stored session is resumed). A newer connection with the same client id takes the session
//! over and this one is closed. The identity a device proves (password, token, or client
//! certificate) is its device id; with auth or ACL rules, its client id must be that identity,
//! each PUBLISH must be allowed by the rules, and its records may not name another device. A
//! token's connection is closed when the token expires.

use std::net::IpAddr;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;
use weir_proto::{Record, SourceProtocol};
use weir_protocols::mqtt::session::{
    ConnectDecision, ConnectRefusal, ConnectRequest, Event, InflightId, Outcome, Refusal as SessionRefusal,
    Session, SessionLimits, Violation,
};
use weir_protocols::mqtt::DecodeError;
use weir_protocols::payload::{self, DecodeContext, PayloadFormat, PayloadLimits};

use super::admission::Refusal;
use super::ingest::now_ms;
use super::throttle::{self, RateLimits, Throttle};
use super::tls::{TlsByteStream, TlsServer};
use super::{Accepted, ByteStream};
use crate::ack::{AckEvent, AckInbox, AckToken};
use crate::auth::{AuthFailure, Credentials, ListenerAuth, PublishPolicy};
use crate::config::{AckPoint, MqttListenerConfig};
use crate::fabric::{message_items, DeadLetter, Fabric, Item, MessageMeta, SendError};
use crate::metrics::{Metrics, ProtocolLabel, ProtocolReasonLabel, ReasonLabel};
use crate::sessions::{taken_over, Sessions, Takeover};
use crate::shutdown::ShutdownWatch;

/// Bytes asked of the socket per read; many small packets arrive in one read.
const READ_CHUNK: usize = 16 * 1024;

/// When shutdown starts, a connection that has not sent CONNECT yet gets at most this long (or
/// its connect deadline, if sooner) to send it and be told server busy (MQTT 5 CONNACK 0x89,
/// 3.1.1 0x03), so that it does not hold shutdown up.
const SHUTDOWN_CONNECT_GRACE: Duration = Duration::from_secs(1);

/// What every connection of one MQTT listener shares.
pub struct MqttContext {
    config: MqttListenerConfig,
    fabric: Fabric,
    metrics: Arc<Metrics>,
    /// Metric label: `mqtt`, or `mqtt_ws` for MQTT over WebSocket.
    label: &'static str,
    protocol: SourceProtocol,
    /// Per-message counter, looked up once (a family lookup per message would cost a lock).
    messages_received: Counter,
    /// Persistent sessions and the live connection of each client id, shared by every MQTT
    /// listener.
    sessions: Arc<Sessions>,
    /// Device authentication; `None`: devices are anonymous or identified by certificate.
    auth: Option<Arc<ListenerAuth>>,
    /// What devices may publish to (replaced in place by a config reload).
    policy: Arc<PublishPolicy>,
    /// Each connection's message and byte rate (changed in place by a config reload).
    rates: Arc<RateLimits>,
}

impl MqttContext {
    /// `protocol` is `Mqtt` for TCP listeners and `MqttWs` for `/mqtt` on a ws listener.
    pub fn new(
        config: MqttListenerConfig,
        fabric: Fabric,
        metrics: Arc<Metrics>,
        protocol: SourceProtocol,
    ) -> Self {
        let label = if protocol == SourceProtocol::MqttWs { "mqtt_ws" } else { "mqtt" };
        let messages_received =
            metrics.messages_received.get_or_create(&ProtocolLabel { protocol: label }).clone();
        let sessions = Sessions::without_store(Arc::clone(&metrics));
        let rates = Arc::new(RateLimits::new(config.max_messages_per_s, config.max_bytes_per_s));
        Self {
            config,
            fabric,
            metrics,
            label,
            protocol,
            messages_received,
            sessions,
            auth: None,
            policy: Arc::default(),
            rates,
        }
    }

    /// Authenticates devices with `auth` and enforces `policy` on their publishes.
    pub fn with_auth(mut self, auth: Option<Arc<ListenerAuth>>, policy: Arc<PublishPolicy>) -> Self {
        self.auth = auth;
        self.policy = policy;
        self
    }

    /// Paces connections by `rates` (the listener's, shared with what a reload changes).
    pub fn with_rates(mut self, rates: Arc<RateLimits>) -> Self {
        self.rates = rates;
        self
    }

    /// Uses `sessions` (the gateway's store, shared with its other MQTT listeners) instead of
    /// keeping no session past its connection.
    pub fn with_sessions(mut self, sessions: Arc<Sessions>) -> Self {
        self.sessions = sessions;
        self
    }
}

/// Why a connection ended; the label of `weir_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CloseReason {
    PeerClosed,
    Disconnect,
    ConnectTimeout,
    KeepaliveTimeout,
    ProtocolError,
    StoreFailed,
    Shutdown,
    Io,
    /// The CONNECT was refused (a full session store, and later authentication).
    Refused,
    /// No decision on the CONNECT in time (the session store was too slow).
    ServerUnavailable,
    /// A newer connection with the same client id took over.
    TakenOver,
    /// The token the connection was accepted with expired.
    CredentialsExpired,
    /// A publish the ACL does not allow, on a connection that cannot be told otherwise (QoS 0,
    /// MQTT 3.1.1).
    NotAuthorized,
}

impl CloseReason {
    fn label(self) -> &'static str {
        match self {
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::Disconnect => "disconnect",
            CloseReason::ConnectTimeout => "connect_timeout",
            CloseReason::KeepaliveTimeout => "keepalive_timeout",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::StoreFailed => "store_failed",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Io => "io_error",
            CloseReason::Refused => "connect_refused",
            CloseReason::ServerUnavailable => "server_unavailable",
            CloseReason::TakenOver => "taken_over",
            CloseReason::CredentialsExpired => "credentials_expired",
            CloseReason::NotAuthorized => "not_authorized",
        }
    }
}

/// Serves one MQTT connection over TCP until it closes or shutdown drains it.
pub fn serve(
    accepted: Accepted,
    ctx: Arc<MqttContext>,
    shutdown: ShutdownWatch,
) -> impl Future<Output = ()> + Send {
    let Accepted { stream, id, permit, peer } = accepted;
    let _ = stream.set_nodelay(true);
    // The connection future is the task itself (no async wrapper keeping `accepted` or a second
    // copy of the future): its size is what every idle connection costs.
    serve_stream(stream, id, Some(peer.ip()), ctx, shutdown, Some(permit), None)
}

/// Answers a connection admission control refused: reads its CONNECT (for at most
/// [`REFUSAL_DEADLINE`](super::admission::REFUSAL_DEADLINE)), answers with a CONNACK saying why
/// (MQTT 5: 0x89 server busy for the connection rate, 0x97 quota exceeded for too many from its
/// address; 3.1/3.1.1: 0x03 server unavailable) and closes. Whatever goes wrong, the
/// connection is closed by the deadline: a refused device is never left hanging.
pub async fn refuse(mut stream: tokio::net::TcpStream, refusal: Refusal, max_packet_bytes: usize) {
    use tokio::io::AsyncReadExt;
    let now = Instant::now();
    let deadline = now + super::admission::REFUSAL_DEADLINE;
    let limits = SessionLimits {
        connect_timeout: super::admission::REFUSAL_DEADLINE,
        // A CONNECT is small; a refused device gets no room for more.
        max_packet_size: max_packet_bytes.min(64 * 1024),
        ..SessionLimits::default()
    };
    let mut session = Session::new(limits, now.into_std());
    let code = match refusal {
        Refusal::Rate => ConnectRefusal::ServerBusy,
        Refusal::PerAddress => ConnectRefusal::QuotaExceeded,
    };
    let mut buf = BytesMut::new();
    let _ = tokio::time::timeout_at(deadline, async {
        loop {
            match session.decoder().decode(&mut buf) {
                Ok(Some(packet)) => {
                    if let Ok(Event::Connect(_)) = session.on_packet(packet, 0) {
                        let _ = session.decide(ConnectDecision::Refuse(code), Instant::now().into_std());
                        let _ = ByteStream::write_all(&mut stream, session.outgoing()).await;
                    }
                    return;
                }
                Ok(None) => {}
                Err(_) => return,
            }
            buf.reserve(1024);
            match stream.read_buf(&mut buf).await {
                Ok(n) if n > 0 => {}
                _ => return,
            }
        }
    })
    .await;
    let _ = tokio::time::timeout(Duration::from_millis(200), ByteStream::shutdown(&mut stream)).await;
}

/// Serves one MQTT connection over TLS: the handshake (under its deadline, here in the
/// connection's task, never in the accept loop), then MQTT. With mutual TLS, the client
/// certificate's identity is the device id of records that name none.
pub fn serve_tls(
    accepted: Accepted,
    tls: Arc<TlsServer>,
    ctx: Arc<MqttContext>,
    shutdown: ShutdownWatch,
) -> impl Future<Output = ()> + Send {
    // The handshake's state is large and gone once it is done: it lives in its own box, and
    // the task's future is the plain connection's plus that box.
    let handshake = Box::pin(async move {
        let Accepted { stream, id, permit, peer } = accepted;
        let _ = stream.set_nodelay(true);
        let mut shutdown = shutdown;
        let handshaken = tls.handshake_until(stream, shutdown.fired()).await?;
        Some((handshaken, id, peer, permit, shutdown))
    });
    async move {
        let Some((handshaken, id, peer, permit, shutdown)) = handshake.await else { return };
        let stream = TlsByteStream::new(handshaken.stream);
        serve_stream(stream, id, Some(peer.ip()), ctx, shutdown, Some(permit), handshaken.identity).await
    }
}

/// Serves one MQTT connection over any byte stream (TCP, TLS, a WebSocket's binary messages).
/// `permit` (the listener's connection slot) is released when the connection ends.
/// `identity` is the device identity of a TLS client certificate; `peer` the source address
/// (failed logins are limited per address).
pub fn serve_stream<S: ByteStream>(
    stream: S,
    id: u64,
    peer: Option<IpAddr>,
    ctx: Arc<MqttContext>,
    shutdown: ShutdownWatch,
    permit: Option<super::ConnectionPermit>,
    identity: Option<Arc<str>>,
) -> impl Future<Output = ()> + Send {
    let label = ProtocolLabel { protocol: ctx.label };
    ctx.metrics.connections_opened.get_or_create(&label).inc();
    ctx.metrics.connections_active.get_or_create(&label).inc();
    let session = Session::new(
        SessionLimits {
            max_inflight: ctx.config.max_inflight,
            connect_timeout: Duration::from_millis(ctx.config.connect_timeout_ms),
            max_packet_size: ctx.config.max_packet_bytes,
            max_user_properties: ctx.config.max_user_properties,
            max_topic_aliases: ctx.config.max_topic_aliases,
            max_keepalive_secs: ctx.config.max_keepalive_s,
            max_topic_bytes: ctx.config.max_topic_bytes,
            max_topic_levels: ctx.config.max_topic_levels,
            ..SessionLimits::default()
        },
        Instant::now().into_std(),
    );
    // The connection owns everything, so the task's future holds one copy of each part (an
    // `async fn` taking it by value would hold two: its argument and the moved-in local).
    let mut connection = Connection {
        session,
        ctx,
        id,
        stream,
        inbox: AckInbox::new(),
        client_id: String::new(),
        identity,
        guard: peer.map_or(Guard::None, Guard::Peer),
        records: Vec::new(),
        shutdown,
        permit,
        takeover: None,
        session_end: SessionEnd::default(),
        throttle: Throttle::default(),
    };
    async move { connection.serve().await }
}

/// A message whose records did not all fit in the fabric at once: the rest wait for room.
struct Waiting {
    items: Vec<Item>,
    /// The worst outcome so far of the message's records.
    outcome: Outcome,
    ack: Option<InflightId>,
    /// Acked through its token (after the commit or the buffer's sync), not on enqueue.
    tracked: bool,
}

/// What a packet leaves the connection task to await once the packet itself is handled.
enum Deferred {
    /// A valid CONNECT, to decide.
    Decide(Box<ConnectRequest>),
    /// A violation: announced (as the protocol version allows), then the connection closes.
    Close(Violation),
    /// A message whose records wait for room in the fabric (it is full).
    Wait(Waiting),
}

/// What one packet asks of the connection task.
enum Step {
    /// No whole packet buffered.
    NeedMore,
    /// Handled; read on.
    Continue,
    Publish {
        topic: String,
        payload: Bytes,
        ack: Option<InflightId>,
        format: Option<PayloadFormat>,
    },
    /// A valid CONNECT, to decide.
    Connect(Box<ConnectRequest>),
    Disconnect {
        session_expiry_secs: Option<u32>,
    },
    Violation(Violation),
}

/// What a connection keeps for authentication, by phase.
#[derive(Debug, Clone, Copy)]
enum Guard {
    /// Before the CONNECT is decided: where the device connects from.
    Peer(IpAddr),
    /// Accepted with a token: when it expires.
    Expires(Instant),
    None,
}

impl Guard {
    fn peer(self) -> Option<IpAddr> {
        match self {
            Guard::Peer(ip) => Some(ip),
            _ => None,
        }
    }

    fn expires(self) -> Option<Instant> {
        match self {
            Guard::Expires(at) => Some(at),
            _ => None,
        }
    }
}

/// Why a publish stopped the connection.
enum Stop {
    /// Closed (the fabric is closing, an ack could not be given).
    Closed(CloseReason),
    /// Refused (not authorized): to be announced, then closed.
    Violation(Violation),
}

/// What the session store must hear when the connection ends.
#[derive(Debug, Default, Clone, Copy)]
struct SessionEnd {
    /// The store may hold a session record held by this connection.
    stored: bool,
    /// The MQTT 5 DISCONNECT's Session Expiry Interval, replacing the granted one.
    expiry_secs: Option<u32>,
}

struct Connection<S> {
    ctx: Arc<MqttContext>,
    id: u64,
    session: Session,
    stream: S,
    /// Outcome reports of this connection's messages.
    inbox: Arc<AckInbox>,
    client_id: String,
    /// The identity the device proved (password or token, else its TLS client certificate):
    /// the device of records that name none, in place of the client id, and what ACL
    /// templates are filled with.
    identity: Option<Arc<str>>,
    /// The source address until the CONNECT is decided (for the failed-login limit), then
    /// when the token the connection was accepted with expires (it is closed then). One field
    /// for both keeps every idle connection smaller.
    guard: Guard,
    /// Scratch space for one message's records, reused.
    records: Vec<Record>,
    shutdown: ShutdownWatch,
    /// The listener's connection slot, released when the connection ends.
    permit: Option<super::ConnectionPermit>,
    /// Fires when a newer connection takes this client id over; set once connected.
    takeover: Option<Arc<Takeover>>,
    session_end: SessionEnd,
    /// The device's message and byte budget; over it, the connection is not read for a while.
    throttle: Throttle,
}

impl<S: ByteStream> Connection<S> {
    async fn serve(&mut self) {
        let closed = self.run().await;
        tracing::debug!(reason = closed.label(), "connection closed");
        if self.takeover.take().is_some() {
            self.ctx.sessions.unregister(&self.client_id, self.id);
        }
        if self.session_end.stored {
            // Its expiry clock starts now (boxed: rare, and not carried by an idle connection).
            let sessions = Arc::clone(&self.ctx.sessions);
            let client_id = std::mem::take(&mut self.client_id);
            Box::pin(sessions.disconnected(client_id, self.id, self.session_end.expiry_secs)).await;
        }
        let metrics = &self.ctx.metrics;
        metrics.connections_active.get_or_create(&ProtocolLabel { protocol: self.ctx.label }).dec();
        metrics
            .connections_closed
            .get_or_create(&ProtocolReasonLabel { protocol: self.ctx.label, reason: closed.label() })
            .inc();
        drop(self.permit.take());
    }

    async fn run(&mut self) -> CloseReason {
        // Allocated when input arrives and released when drained: an idle connection holds none.
        let mut buf = BytesMut::new();
        // Whether the socket was being read on the previous turn; resuming resets the keepalive.
        let mut was_reading = true;
        // `None` while reading; the reason once reading stopped and only acks remain to send.
        let mut stopped: Option<CloseReason> = None;
        // Shutdown was signalled (a connected device then stops being read; one without CONNECT
        // is still read, briefly, to be told server busy).
        let mut draining = false;
        // A publish was refused in a way that closes the connection.
        let mut refused: Option<CloseReason> = None;
        loop {
            while stopped.is_none()
                && refused.is_none()
                && self.session.can_read()
                && !self.throttle.is_paused()
            {
                let deferred = match self.step(&mut buf) {
                    Step::NeedMore => break,
                    Step::Continue => None,
                    Step::Publish { topic, payload, ack, format } => {
                        let now = Instant::now();
                        if let Some(pause) = self.throttle.charge(&self.ctx.rates, payload.len(), now) {
                            throttle::count_pause(&self.ctx.metrics, self.ctx.label, pause, now);
                        }
                        match self.publish(topic, payload, ack, format) {
                            Ok(waiting) => waiting.map(Deferred::Wait),
                            Err(Stop::Closed(closed)) => return closed,
                            Err(Stop::Violation(violation)) => {
                                // Closed after the flush below sends what the session queued
                                // (acks before it; MQTT 5: the DISCONNECT saying why).
                                refused = Some(self.violation_reason(violation));
                                break;
                            }
                        }
                    }
                    Step::Connect(request) => Some(Deferred::Decide(request)),
                    Step::Disconnect { session_expiry_secs } => {
                        self.session_end.expiry_secs = session_expiry_secs;
                        stopped = Some(CloseReason::Disconnect);
                        None
                    }
                    Step::Violation(violation) => Some(Deferred::Close(violation)),
                };
                // Awaited after the match, not in its arms: there the packet's `Step` (80 bytes)
                // would be kept across the awaits, and so in every idle connection's task.
                if let Some(deferred) = deferred {
                    if let Err(closed) = self.settle(deferred).await {
                        return closed;
                    }
                }
            }
            if let Err(closed) = self.flush().await {
                return closed;
            }
            if let Some(reason) = refused {
                let _ = self.stream.shutdown().await;
                return reason;
            }
            if let Some(reason) = stopped {
                // Reading is over; leave once every in-flight message has its answer.
                if self.session.pending() == 0 || reason == CloseReason::Disconnect {
                    if reason == CloseReason::Shutdown {
                        self.session.say_goodbye();
                        let _ = self.flush().await;
                    }
                    return reason;
                }
            }
            let reading = stopped.is_none() && self.session.can_read() && !self.throttle.is_paused();
            if reading && !was_reading {
                self.session.note_activity(Instant::now().into_std());
            }
            was_reading = reading;
            if buf.is_empty() {
                // Keep nothing from a busy moment while waiting: an idle connection holds only
                // its state.
                if buf.capacity() > 0 {
                    buf = BytesMut::new();
                }
                if self.records.capacity() > 0 {
                    self.records = Vec::new();
                }
                self.session.release_idle_memory();
                self.inbox.release_idle_memory();
            }
            // One timer for the session's deadline (while reading), the token's expiry and the
            // end of a pause.
            let deadline = [
                self.session.deadline().filter(|_| reading).map(Instant::from_std),
                self.guard.expires(),
                self.throttle.paused_until().filter(|_| stopped.is_none()),
            ]
            .into_iter()
            .flatten()
            .min();
            tokio::select! {
                ready = self.stream.readable(), if reading => {
                    if let Err(error) = ready {
                        tracing::debug!(%error, "read failed");
                        return CloseReason::Io;
                    }
                    buf.reserve(READ_CHUNK);
                    match self.stream.try_read_buf(&mut buf) {
                        Ok(0) => return CloseReason::PeerClosed,
                        // Only a whole packet counts as activity (in `step`): a device trickling
                        // bytes that never complete one is closed at its keepalive deadline.
                        Ok(_) => {}
                        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(error) => {
                            tracing::debug!(%error, "read failed");
                            return CloseReason::Io;
                        }
                    }
                },
                event = self.inbox.next() => {
                    if let Err(closed) = self.apply_ack(event) {
                        // Acks of stored messages queued before the failure, then (MQTT 5)
                        // the DISCONNECT that says why.
                        let _ = self.flush().await;
                        return closed;
                    }
                },
                _ = sleep_until_some(deadline), if deadline.is_some() => {
                    let now = Instant::now();
                    if self.throttle.is_paused() && self.throttle.resume_if_due(now) {
                        continue;
                    }
                    if self.guard.expires().is_some_and(|e| e <= now) {
                        tracing::debug!("credentials expired; closing");
                        let violation = self.session.credentials_expired();
                        refused = Some(self.violation_reason(violation));
                        continue;
                    }
                    if !reading {
                        // Only the session's deadline is left, and it runs while reading.
                        continue;
                    }
                    if draining {
                        // No CONNECT came within the shutdown grace: not the device's error.
                        let _ = self.stream.shutdown().await;
                        return CloseReason::Shutdown;
                    }
                    let violation = self.session.timed_out();
                    return Box::pin(self.close_for(violation)).await;
                },
                _ = taken_over(self.takeover.as_deref()) => {
                    let violation = self.session.taken_over();
                    return Box::pin(self.close_for(violation)).await;
                },
                _ = self.shutdown.fired(), if !draining && stopped.is_none() => {
                    draining = true;
                    if self.session.is_connected() {
                        stopped = Some(CloseReason::Shutdown);
                    } else {
                        self.session.begin_shutdown(Instant::now().into_std(), SHUTDOWN_CONNECT_GRACE);
                    }
                },
            }
        }
    }

    /// Decodes the next packet and runs it through the session. Synchronous on purpose: a
    /// packet is large, and only what a publish needs is carried across its await (this keeps
    /// every connection's task small).
    fn step(&mut self, buf: &mut BytesMut) -> Step {
        // The CONNECT decides how the packets after it parse.
        let packet = match self.session.decoder().decode(buf) {
            Ok(Some(packet)) => {
                self.session.note_activity(Instant::now().into_std());
                packet
            }
            Ok(None) => return Step::NeedMore,
            Err(error) => return Step::Violation(self.session.on_decode_error(error)),
        };
        match self.session.on_packet(packet, self.id) {
            Ok(Event::None) => Step::Continue,
            Ok(Event::Connect(request)) => Step::Connect(request),
            Ok(Event::Publish { topic, payload, ack, format, .. }) => {
                Step::Publish { topic, payload, ack, format }
            }
            Ok(Event::Disconnect { session_expiry_secs }) => Step::Disconnect { session_expiry_secs },
            Err(violation) => Step::Violation(violation),
        }
    }

    /// Decides a CONNECT with the session store (the record is durable before the CONNACK is
    /// queued), within the connect deadline, then takes the client id over from any live
    /// connection holding it.
    /// Awaits what a packet left to wait for. Each is boxed: rare, and inline they would make
    /// every connection's task larger while it idles.
    async fn settle(&mut self, deferred: Deferred) -> Result<(), CloseReason> {
        match deferred {
            // Nothing is read until the CONNECT is decided.
            Deferred::Decide(request) => Box::pin(self.decide_connect(request)).await,
            Deferred::Close(violation) => Err(Box::pin(self.close_for(violation)).await),
            Deferred::Wait(waiting) => {
                Box::pin(self.publish_waiting(waiting)).await?;
                // Waiting for room in the fabric is weir's delay, not the device's silence.
                self.session.note_activity(Instant::now().into_std());
                Ok(())
            }
        }
    }

    async fn decide_connect(&mut self, request: Box<ConnectRequest>) -> Result<(), CloseReason> {
        if let Err(refusal) = Box::pin(self.authenticate(&request)).await {
            self.client_id = request.client_id;
            return Err(match refusal {
                Some(refusal) => {
                    match self.session.decide(ConnectDecision::Refuse(refusal), Instant::now().into_std()) {
                        Err(violation) => self.close_for(violation).await,
                        Ok(()) => CloseReason::Refused,
                    }
                }
                None => {
                    let violation = self.session.timed_out();
                    self.close_for(violation).await
                }
            });
        }
        let device = self.identity.as_deref().unwrap_or(&request.client_id);
        tracing::Span::current().record("device", device);
        let sessions = Arc::clone(&self.ctx.sessions);
        // Should the deadline pass, the store may still record the session: its end must be
        // recorded too, or it would look connected until the next restart.
        self.session_end.stored = sessions.may_store(&request);
        let deadline = self.session.deadline().map(Instant::from_std);
        let decided = tokio::select! {
            decided = sessions.decide(&request, self.id) => Some(decided),
            _ = sleep_until_some(deadline) => None,
        };
        self.client_id = request.client_id;
        let Some(decided) = decided else {
            let violation = self.session.timed_out();
            return Err(self.close_for(violation).await);
        };
        self.session_end.stored = decided.stored;
        if let Err(violation) = self.session.decide(decided.decision, Instant::now().into_std()) {
            return Err(self.close_for(violation).await);
        }
        self.takeover = Some(sessions.register(&self.client_id, self.id));
        Ok(())
    }

    /// Authenticates the CONNECT with the listener's provider (under the connect deadline),
    /// and checks that an identified device's client id is its identity where the publish
    /// policy is enforced. `Err(None)`: the deadline passed.
    async fn authenticate(&mut self, request: &ConnectRequest) -> Result<(), Option<ConnectRefusal>> {
        if let Some(auth) = self.ctx.auth.clone() {
            let credentials =
                Credentials { username: request.username.as_deref(), password: request.password.as_deref() };
            let deadline = self.session.deadline().map(Instant::from_std);
            let authenticated = tokio::select! {
                result = auth.authenticate(self.ctx.label, self.guard.peer(), credentials) => result,
                _ = sleep_until_some(deadline) => return Err(None),
            };
            let refusal = |failure: &AuthFailure| match failure {
                AuthFailure::RateLimited => ConnectRefusal::QuotaExceeded,
                f if f.is_bad_credentials() => ConnectRefusal::BadUserNameOrPassword,
                _ => ConnectRefusal::NotAuthorized,
            };
            let authenticated = authenticated.map_err(|failure| Some(refusal(&failure)))?;
            if let Some(certified) = self.identity.as_deref().filter(|c| **c != *authenticated.device_id) {
                let failure = AuthFailure::IdentityMismatch(format!(
                    "authenticated as {:?}, the client certificate names {certified:?}",
                    authenticated.device_id
                ));
                auth.count_failure(self.ctx.label, &failure);
                tracing::info!(%failure, "connection refused");
                return Err(Some(ConnectRefusal::NotAuthorized));
            }
            self.guard = match authenticated.expires {
                Some(at) => {
                    let left = at.duration_since(std::time::SystemTime::now()).unwrap_or_default();
                    Guard::Expires(Instant::now() + left)
                }
                None => Guard::None,
            };
            self.identity = Some(authenticated.device_id);
        }
        if let (true, Some(identity)) = (self.ctx.policy.is_enforced(), self.identity.as_deref()) {
            if request.client_id != identity {
                let failure = AuthFailure::IdentityMismatch(format!(
                    "the client id {:?} is not the authenticated identity {identity:?}",
                    request.client_id
                ));
                let label = ProtocolReasonLabel { protocol: self.ctx.label, reason: "client_id_mismatch" };
                self.ctx.metrics.auth_failures.get_or_create(&label).inc();
                tracing::info!(%failure, "connection refused");
                return Err(Some(ConnectRefusal::NotAuthorized));
            }
        }
        Ok(())
    }

    /// Refuses a message the device may not publish (counted): MQTT 5 QoS 1/2 get PUBACK/PUBREC
    /// 0x87 in order with the other acks and the connection goes on; QoS 0 (nothing to answer)
    /// and 3.1.1 (no error ack) close the connection, MQTT 5 after DISCONNECT 0x87.
    fn deny_publish(&mut self, topic: &str, ack: Option<InflightId>, why: &str) -> Result<(), Stop> {
        self.ctx.metrics.acl_denied.get_or_create(&ProtocolLabel { protocol: self.ctx.label }).inc();
        tracing::debug!(topic, why, "publish not authorized");
        match ack {
            Some(id) if self.session.version().is_v5() => {
                self.session.refuse(id, SessionRefusal::NotAuthorized).map_err(Stop::Violation)
            }
            _ => Err(Stop::Violation(self.session.not_authorized())),
        }
    }

    /// Decodes one message and enqueues its records (or its dead letter) where the fabric has
    /// room now. Synchronous, the hot path; what has to wait for room is returned.
    fn publish(
        &mut self,
        topic: String,
        payload: Bytes,
        ack: Option<InflightId>,
        format: Option<PayloadFormat>,
    ) -> Result<Option<Waiting>, Stop> {
        let metrics = Arc::clone(&self.ctx.metrics);
        self.ctx.messages_received.inc();
        if !self.ctx.policy.allows(&topic, self.identity.as_deref()) {
            return self.deny_publish(&topic, ack, "no ACL rule allows the topic").map(|()| None);
        }
        let decoded = {
            let ctx = DecodeContext {
                fallback_device_id: self.identity.as_deref().unwrap_or(&self.client_id),
                protocol: self.ctx.protocol,
                source: &topic,
                received_ts_ms: now_ms(),
                keep_raw: self.ctx.config.keep_raw,
                limits: PayloadLimits::default(),
            };
            let format = format.unwrap_or_else(|| PayloadFormat::from(self.ctx.config.payload));
            payload::decode(format, &payload, &ctx, &mut self.records)
        };
        // An identified device writes its own records only (checked before the ack token is
        // made: a token dropped unsettled would count as a failed store).
        if let (true, Some(identity), Ok(())) =
            (self.ctx.policy.is_enforced(), self.identity.as_deref(), &decoded)
        {
            if self.records.iter().any(|r| r.device_id != identity) {
                self.records.clear();
                return self.deny_publish(&topic, ack, "a record names another device").map(|()| None);
            }
        }
        let point = self.ctx.config.ack;
        let tracked = point != AckPoint::Received;
        let token = ack.and_then(|id| AckToken::for_point(point, id.get(), &self.inbox));
        let mut items = Vec::new();
        let meta = MessageMeta::new(
            &payload,
            format.unwrap_or_else(|| PayloadFormat::from(self.ctx.config.payload)),
        );
        match decoded {
            Ok(()) => {
                metrics.records_decoded.inc_by(self.records.len() as u64);
                message_items(&mut self.records, token, meta, &mut items);
            }
            Err(error) => {
                metrics.records_dead_lettered.get_or_create(&ReasonLabel { reason: "undecodable" }).inc();
                if crate::logs::DEAD_LETTERS.allow() {
                    tracing::warn!(%error, device = self.device_id(), topic, "payload not decodable; dead-lettered");
                }
                let error = error.to_string();
                if let (Some(id), true) = (ack, self.session.version().is_v5()) {
                    // Answered 0x99 once the dead letter is stored, so the device knows.
                    self.session.note_undecodable(id, error.clone());
                }
                let letter = DeadLetter {
                    device_id: self.device_id().to_owned(),
                    protocol: self.ctx.protocol,
                    source: topic,
                    error,
                    raw: payload,
                    received_ts_ms: now_ms(),
                };
                items.push(Item::dead_letter(letter, token).of_message(meta));
            }
        }
        let mut items = items.into_iter();
        while let Some(item) = items.next() {
            match self.ctx.fabric.try_send_now(item) {
                Ok(()) => {}
                Err(SendError::Full(item)) => {
                    let rest = std::iter::once(item).chain(items).collect();
                    return Ok(Some(Waiting { items: rest, outcome: Outcome::Stored, ack, tracked }));
                }
                Err(SendError::Closed(item)) => {
                    item.settle(Outcome::Failed);
                    return Err(Stop::Closed(CloseReason::Shutdown));
                }
            }
        }
        self.published(ack, tracked, Outcome::Stored).map_err(Stop::Closed)?;
        Ok(None)
    }

    /// The device of records that name none: the certificate identity, else the client id.
    fn device_id(&self) -> &str {
        self.identity.as_deref().unwrap_or(&self.client_id)
    }

    /// Enqueues what [`Connection::publish`] could not, waiting for room in the fabric while
    /// still writing acks for earlier messages.
    async fn publish_waiting(&mut self, waiting: Waiting) -> Result<(), CloseReason> {
        let Waiting { items, mut outcome, ack, tracked } = waiting;
        for item in items {
            let stored = self.enqueue(item).await?;
            if stored != Outcome::Stored {
                outcome = stored;
            }
        }
        self.published(ack, tracked, outcome)
    }

    /// Every record of a message is in the fabric (or dropped): with `ack = "received"`, that
    /// is when the device is acknowledged.
    fn published(
        &mut self,
        ack: Option<InflightId>,
        tracked: bool,
        outcome: Outcome,
    ) -> Result<(), CloseReason> {
        if let (Some(id), false) = (ack, tracked) {
            self.session.complete(id, outcome).map_err(|v| self.violation_reason(v))?;
        }
        Ok(())
    }

    /// Sends one item into the fabric, writing acks that complete while it waits for room.
    async fn enqueue(&mut self, item: Item) -> Result<Outcome, CloseReason> {
        let fabric: Fabric = self.ctx.fabric.clone();
        let send = fabric.send(item);
        tokio::pin!(send);
        loop {
            tokio::select! {
                sent = &mut send => return fabric.settle_send(sent).map_err(|_| CloseReason::Shutdown),
                event = self.inbox.next() => {
                    let applied = self.apply_ack(event);
                    self.flush().await?;
                    applied?;
                }
            }
        }
    }

    fn apply_ack(&mut self, (id, outcome): AckEvent) -> Result<(), CloseReason> {
        self.session.complete(InflightId::from_raw(id), outcome).map_err(|v| self.violation_reason(v))?;
        // Take every ack already waiting, so they leave in one write.
        while let Some((id, outcome)) = self.inbox.try_next() {
            self.session.complete(InflightId::from_raw(id), outcome).map_err(|v| self.violation_reason(v))?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), CloseReason> {
        let out = self.session.outgoing();
        if out.is_empty() {
            return Ok(());
        }
        let result = self.stream.write_all(out).await;
        out.clear();
        result.map_err(|error| {
            tracing::debug!(%error, "write failed");
            CloseReason::Io
        })
    }

    /// Counts a violation, sends whatever the session queued for it (e.g. a CONNACK with a
    /// return code), and closes.
    async fn close_for(&mut self, violation: Violation) -> CloseReason {
        let reason = self.violation_reason(violation);
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
        reason
    }

    fn violation_reason(&self, violation: Violation) -> CloseReason {
        let (reason, what) = match &violation {
            Violation::StoreFailed(_) => (CloseReason::StoreFailed, "store_failed"),
            Violation::ConnectTimeout => (CloseReason::ConnectTimeout, "connect_timeout"),
            Violation::KeepaliveTimeout => (CloseReason::KeepaliveTimeout, "keepalive_timeout"),
            Violation::ServerBusy => {
                // Refused because weir is going away: not the device's fault, not counted.
                tracing::debug!(%violation, "closing connection");
                return CloseReason::Shutdown;
            }
            // Decisions of weir's, not the device's errors: counted where they are made.
            Violation::ConnectRefused(_) => {
                tracing::debug!(%violation, "closing connection");
                return CloseReason::Refused;
            }
            Violation::DecisionTimeout => {
                tracing::warn!(%violation, "closing connection");
                return CloseReason::ServerUnavailable;
            }
            Violation::SessionTakenOver => {
                tracing::debug!(%violation, "closing connection");
                return CloseReason::TakenOver;
            }
            // Counted where decided (weir_acl_denied_total).
            Violation::NotAuthorized => {
                tracing::debug!(%violation, "closing connection");
                return CloseReason::NotAuthorized;
            }
            Violation::CredentialsExpired => {
                tracing::debug!(%violation, "closing connection");
                return CloseReason::CredentialsExpired;
            }
            Violation::Malformed(DecodeError::PacketTooLarge { .. }) => {
                (CloseReason::ProtocolError, "packet_too_large")
            }
            Violation::TopicTooLong { .. } => (CloseReason::ProtocolError, "topic_too_long"),
            Violation::Malformed(DecodeError::TooManyUserProperties { .. }) => {
                (CloseReason::ProtocolError, "too_many_user_properties")
            }
            Violation::Malformed(
                DecodeError::DuplicateProperty(_)
                | DecodeError::PropertyNotAllowed { .. }
                | DecodeError::InvalidPropertyValue { .. }
                | DecodeError::UnknownProperty(_),
            ) => (CloseReason::ProtocolError, "invalid_property"),
            Violation::Malformed(_) => (CloseReason::ProtocolError, "malformed_packet"),
            Violation::ProtocolError(_) => (CloseReason::ProtocolError, "protocol_error"),
            Violation::ReceiveMaximumExceeded(_) => (CloseReason::ProtocolError, "receive_maximum_exceeded"),
            Violation::TopicAliasInvalid { .. } => (CloseReason::ProtocolError, "topic_alias_invalid"),
            Violation::UnknownTopicAlias(_) => (CloseReason::ProtocolError, "unknown_topic_alias"),
            Violation::AliasTableFull => (CloseReason::ProtocolError, "topic_alias_table_full"),
            Violation::BadAuthenticationMethod(_) => {
                (CloseReason::ProtocolError, "bad_authentication_method")
            }
            Violation::NotConnected => (CloseReason::ProtocolError, "not_connected"),
            Violation::DuplicateConnect => (CloseReason::ProtocolError, "duplicate_connect"),
            Violation::ClientIdRejected(_) => (CloseReason::ProtocolError, "client_id_rejected"),
            Violation::UnsupportedProtocolLevel(_) => {
                (CloseReason::ProtocolError, "unsupported_protocol_level")
            }
            Violation::UnexpectedPacket(_) => (CloseReason::ProtocolError, "unexpected_packet"),
        };
        if reason == CloseReason::StoreFailed {
            tracing::warn!(%violation, "closing without ack so the device resends");
        } else {
            tracing::debug!(%violation, "closing connection");
        }
        if reason != CloseReason::StoreFailed {
            self.count_error(what);
        }
        reason
    }

    fn count_error(&self, what: &'static str) {
        self.ctx
            .metrics
            .protocol_errors
            .get_or_create(&ProtocolReasonLabel { protocol: self.ctx.label, reason: what })
            .inc();
    }
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
