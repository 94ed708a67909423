//! The server side of one MQTT connection (3.1, 3.1.1 or 5) as a plain state machine: packets
//! in, events and packets to write out. The connection task does the I/O and the clock; this
//! decides.
//!
//! A valid CONNECT is not answered at once: the session reports it ([`Event::Connect`]) and waits
//! for the gateway's [`ConnectDecision`] (the session store says whether a session is present;
//! authentication will decide here too). Until then no further packet is processed, and the
//! connect deadline still runs.
//!
//! MQTT 5 specifics decided here: the CONNACK advertises Receive Maximum (= `max_inflight`),
//! Maximum Packet Size, Topic Alias Maximum and, when they differ from the client's, Server Keep
//! Alive and the Session Expiry Interval granted. Acks carry reason codes (0x99 for a
//! dead-lettered payload, 0x97 for a message dropped under `drop_newest`, 0x87 for a refused
//! one), and every violation is announced with a DISCONNECT reason code before the close.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::{
    encode, encoded_len, AckV5, ConnAck, ConnAckV5, Connect, ConnectReturnCode, ConnectV5, DecodeError,
    Decoder, DisconnectV5, Packet, Properties, ProtocolVersion, Publish, PublishV5, QoS, ReasonCode, SubAck,
    SubAckV5, UnsubAckV5,
};
use crate::payload::PayloadFormat;

/// Per-connection bounds, fixed when the connection starts.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// QoS 1/2 messages received but not yet acknowledged (plus QoS 2 ids awaiting PUBREL).
    /// MQTT 3.1.1 has no Receive Maximum: at the bound the connection stops reading, which is
    /// the backpressure such a device sees. MQTT 5 devices are told this bound as Receive
    /// Maximum; weir keeps reading them (so PINGREQ is answered) and a device that exceeds it is
    /// disconnected with 0x93.
    pub max_inflight: usize,
    /// Longest accepted client id, in bytes (MQTT 3.1 said 23; weir accepts up to this).
    pub max_client_id_len: usize,
    /// Time from the connection's start to a complete CONNECT.
    pub connect_timeout: Duration,
    /// Largest packet accepted, fixed header included; advertised to MQTT 5 devices as
    /// Maximum Packet Size. A larger one closes the connection (MQTT 5: DISCONNECT 0x95).
    pub max_packet_size: usize,
    /// User Properties accepted in one packet; more closes the connection (MQTT 5: DISCONNECT
    /// 0x97 quota exceeded) before they are allocated.
    pub max_user_properties: usize,
    /// Topic aliases an MQTT 5 device may define (Topic Alias Maximum); 0 disables them.
    pub max_topic_aliases: u16,
    /// Longest keepalive a device gets: an MQTT 5 device asking for 0 (none) or more is told
    /// this as Server Keep Alive. MQTT 3.1.1 cannot be told; such a device is held to it all the
    /// same (closed after 1.5 times it of silence), so a keepalive of 0 or 65,535 s cannot pin a
    /// silent connection (SlowITe). 0: devices keep what they asked for.
    pub max_keepalive_secs: u16,
    /// Longest topic name accepted, in bytes (after topic alias resolution); a longer one closes
    /// the connection (MQTT 5: DISCONNECT 0x90 topic name invalid).
    pub max_topic_bytes: usize,
    /// Most levels (`/`-separated parts) in a topic name; more closes the connection as above.
    pub max_topic_levels: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            max_inflight: 1024,
            max_client_id_len: 256,
            connect_timeout: Duration::from_secs(10),
            max_packet_size: 1 << 20,
            max_user_properties: 32,
            max_topic_aliases: 16,
            max_keepalive_secs: 600,
            max_topic_bytes: 1024,
            max_topic_levels: 32,
        }
    }
}

/// Most bytes of topic names one connection's alias table may hold: with `max_topic_aliases`
/// this bounds what an idle MQTT 5 connection keeps. A device that goes beyond is disconnected
/// with 0x97 (quota exceeded).
pub const MAX_ALIAS_TABLE_BYTES: usize = 64 * 1024;

/// What the sink finally did with every record of one QoS 1/2 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Committed (or dead-lettered, also a durable outcome): acknowledge.
    Stored,
    /// Dropped under the `drop_newest` policy, counted by the gateway. MQTT 3.1.1 has no error
    /// PUBACK, so it is acknowledged (resending would not help); MQTT 5 gets 0x97.
    Dropped,
    /// Not stored (sink failed for good, shutdown before commit): close without acknowledging,
    /// so the device resends after it reconnects.
    Failed,
}

/// Why the gateway refuses a message without storing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The device may not publish there. MQTT 5: PUBACK/PUBREC 0x87; MQTT 3.1.1 has no error
    /// ack, so the connection is closed.
    NotAuthorized,
}

/// Identifies one QoS 1/2 message awaiting its outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InflightId(u64);

impl InflightId {
    /// The raw value, for carrying through the gateway's ack tokens.
    pub fn get(self) -> u64 {
        self.0
    }
    /// Rebuilds an id from [`InflightId::get`].
    pub fn from_raw(raw: u64) -> Self {
        Self(raw)
    }
}

/// A valid CONNECT, as the gateway needs it to decide (see [`Session::decide`]).
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The client id, or the one weir assigned (`assigned`) for an empty one.
    pub client_id: String,
    pub assigned: bool,
    pub version: ProtocolVersion,
    /// 3.1/3.1.1 Clean Session, MQTT 5 Clean Start: discard any stored session.
    pub clean_start: bool,
    /// MQTT 5: the Session Expiry Interval asked for, in seconds (0 when absent: the session
    /// ends with the connection; `u32::MAX`: it never expires). `None` for 3.1/3.1.1, where a
    /// session is kept (Clean Session 0) or not, with no expiry of its own.
    pub session_expiry_secs: Option<u32>,
    /// The keepalive in force once accepted (MQTT 5: the Server Keep Alive when weir imposes one).
    pub keep_alive_secs: u16,
    pub username: Option<String>,
    pub password: Option<Bytes>,
}

impl std::fmt::Debug for ConnectRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectRequest")
            .field("client_id", &self.client_id)
            .field("assigned", &self.assigned)
            .field("version", &self.version)
            .field("clean_start", &self.clean_start)
            .field("session_expiry_secs", &self.session_expiry_secs)
            .field("keep_alive_secs", &self.keep_alive_secs)
            .field("username", &self.username)
            // Never in logs.
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The gateway's answer to an [`Event::Connect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectDecision {
    /// CONNACK success. `session_present`: a stored session is resumed (forced to false under
    /// Clean Start, [MQTT-3.2.2-2]). `session_expiry_secs`: the MQTT 5 Session Expiry Interval
    /// granted, told to the device in CONNACK when it differs from the one asked for (ignored
    /// for 3.1/3.1.1).
    Accept { session_present: bool, session_expiry_secs: u32 },
    /// CONNACK with a refusal, then the close.
    Refuse(ConnectRefusal),
}

/// Why the gateway refuses a valid CONNECT; each maps to an MQTT 5 reason code and a 3.1.1
/// return code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectRefusal {
    /// No room for another stored session: 0x97 quota exceeded (3.1.1: 0x03 server
    /// unavailable).
    #[error("no room for another persistent session; connect with a clean session or later")]
    QuotaExceeded,
    /// weir cannot serve the connection now (e.g. its session store failed): 0x88 (3.1.1: 0x03).
    #[error("the server cannot keep sessions right now; connect again later")]
    ServerUnavailable,
    /// Too many new connections (admission control): 0x89 server busy (3.1.1: 0x03).
    #[error("too many new connections; connect again later")]
    ServerBusy,
    /// Wrong credentials: 0x86 (3.1.1: 0x04).
    #[error("bad user name or password")]
    BadUserNameOrPassword,
    /// The device may not connect: 0x87 (3.1.1: 0x05).
    #[error("not authorized to connect")]
    NotAuthorized,
}

impl ConnectRefusal {
    pub fn reason_code(self) -> ReasonCode {
        match self {
            ConnectRefusal::QuotaExceeded => ReasonCode::QuotaExceeded,
            ConnectRefusal::ServerUnavailable => ReasonCode::ServerUnavailable,
            ConnectRefusal::ServerBusy => ReasonCode::ServerBusy,
            ConnectRefusal::BadUserNameOrPassword => ReasonCode::BadUserNameOrPassword,
            ConnectRefusal::NotAuthorized => ReasonCode::NotAuthorized,
        }
    }

    /// The 3.1/3.1.1 return code: 3.1.1 has no quota code, so a full store is "server
    /// unavailable" (the device retries later).
    pub fn return_code(self) -> ConnectReturnCode {
        match self {
            ConnectRefusal::QuotaExceeded
            | ConnectRefusal::ServerUnavailable
            | ConnectRefusal::ServerBusy => ConnectReturnCode::ServerUnavailable,
            ConnectRefusal::BadUserNameOrPassword => ConnectReturnCode::BadUsernameOrPassword,
            ConnectRefusal::NotAuthorized => ConnectReturnCode::NotAuthorized,
        }
    }
}

/// What the gateway must act on after a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Nothing beyond the packets already queued for writing.
    None,
    /// A valid CONNECT: nothing is answered and no packet is read until the gateway calls
    /// [`Session::decide`] (or the connect deadline passes).
    Connect(Box<ConnectRequest>),
    /// A message to decode and enqueue; `ack` is set for QoS 1/2 and must be completed with
    /// [`Session::complete`] once the outcome is known. `format` is the payload decoder MQTT 5
    /// properties ask for (Content Type, Payload Format Indicator), overriding the listener's.
    Publish {
        topic: String,
        payload: Bytes,
        qos: QoS,
        ack: Option<InflightId>,
        format: Option<PayloadFormat>,
    },
    /// The device said goodbye: stop reading and close. MQTT 5: `session_expiry_secs` is the
    /// Session Expiry Interval the DISCONNECT sets, if it sets one.
    Disconnect { session_expiry_secs: Option<u32> },
}

/// Why the connection must close. The caller counts it; packets queued before it (a CONNACK
/// with a refusal code, an MQTT 5 DISCONNECT with [`Violation::reason_code`]) are still sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("malformed packet: {0}")]
    Malformed(#[from] DecodeError),
    #[error("first packet was not CONNECT")]
    NotConnected,
    #[error("second CONNECT on one connection")]
    DuplicateConnect,
    #[error("client id rejected: {0}")]
    ClientIdRejected(&'static str),
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolLevel(u8),
    #[error("a client must not send {0}")]
    UnexpectedPacket(&'static str),
    #[error("protocol error: {0}")]
    ProtocolError(&'static str),
    #[error("a QoS {0} message could not be stored; resend it")]
    StoreFailed(u8),
    #[error("no CONNECT within the connect timeout")]
    ConnectTimeout,
    #[error("nothing received for 1.5 times the keepalive")]
    KeepaliveTimeout,
    #[error("more than {0} QoS 1/2 messages unacknowledged (the Receive Maximum)")]
    ReceiveMaximumExceeded(usize),
    #[error("topic alias {alias} is outside 1..={max} (the Topic Alias Maximum)")]
    TopicAliasInvalid { alias: u16, max: u16 },
    #[error("topic alias {0} was used with an empty topic before it was defined")]
    UnknownTopicAlias(u16),
    #[error("the topic alias table would exceed {MAX_ALIAS_TABLE_BYTES} bytes of topics")]
    AliasTableFull,
    #[error("the server is shutting down; connect again later")]
    ServerBusy,
    #[error("authentication method {0:?} is not supported")]
    BadAuthenticationMethod(String),
    #[error("not authorized")]
    NotAuthorized,
    #[error("connection refused: {0}")]
    ConnectRefused(ConnectRefusal),
    #[error("the server did not decide on the connection within the connect timeout")]
    DecisionTimeout,
    #[error("another connection took over the session")]
    SessionTakenOver,
    #[error("the credentials of this connection have expired; reconnect with new ones")]
    CredentialsExpired,
    #[error("topic name of {bytes} bytes in {levels} levels; at most {max_bytes} bytes and {max_levels} levels are accepted")]
    TopicTooLong { bytes: usize, levels: usize, max_bytes: usize, max_levels: usize },
}

impl Violation {
    /// The MQTT 5 reason code that announces this violation (DISCONNECT, or CONNACK before the
    /// connection is accepted); `None` where the spec wants a silent close.
    pub fn reason_code(&self) -> Option<ReasonCode> {
        Some(match self {
            Violation::Malformed(error) => error.reason_code(),
            Violation::NotConnected | Violation::ConnectTimeout | Violation::UnsupportedProtocolLevel(_) => {
                return None
            }
            Violation::DuplicateConnect
            | Violation::UnexpectedPacket(_)
            | Violation::ProtocolError(_)
            | Violation::UnknownTopicAlias(_) => ReasonCode::ProtocolError,
            Violation::ClientIdRejected(_) => ReasonCode::ClientIdentifierNotValid,
            Violation::StoreFailed(_) => ReasonCode::UnspecifiedError,
            Violation::KeepaliveTimeout => ReasonCode::KeepAliveTimeout,
            Violation::ReceiveMaximumExceeded(_) => ReasonCode::ReceiveMaximumExceeded,
            Violation::TopicAliasInvalid { .. } => ReasonCode::TopicAliasInvalid,
            Violation::TopicTooLong { .. } => ReasonCode::TopicNameInvalid,
            Violation::AliasTableFull => ReasonCode::QuotaExceeded,
            Violation::ServerBusy => ReasonCode::ServerBusy,
            Violation::BadAuthenticationMethod(_) => ReasonCode::BadAuthenticationMethod,
            Violation::NotAuthorized => ReasonCode::NotAuthorized,
            Violation::ConnectRefused(refusal) => refusal.reason_code(),
            Violation::DecisionTimeout => ReasonCode::ServerUnavailable,
            Violation::SessionTakenOver => ReasonCode::SessionTakenOver,
            // MQTT 5.0 §3.14.2.1: 0xA0 "Maximum connect time: the maximum connection time
            // authorized for this connection has been exceeded" — what an expired token is.
            Violation::CredentialsExpired => ReasonCode::MaximumConnectTime,
        })
    }
}

#[derive(Debug)]
struct Inflight {
    id: u64,
    pkid: u16,
    qos: QoS,
    outcome: Option<Outcome>,
    refusal: Option<Refusal>,
    /// Set when the payload was dead-lettered: why, for the MQTT 5 0x99 ack.
    undecodable: Option<String>,
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for CONNECT.
    Connecting,
    /// CONNECT received, waiting for the gateway's decision; nothing else is read.
    Deciding,
    /// CONNACK sent.
    Connected,
    /// CONNECT refused (or not decided in time); the connection closes.
    Refused,
}

/// A set of packet ids, kept as a sorted vector: 24 bytes in every connection's session (a
/// `HashSet<u16>` is 48), 2 bytes per id, and no hasher. It holds at most the in-flight window
/// (`max_inflight`), so an insert's shift is short, and ids usually arrive in order (appended).
#[derive(Debug, Default)]
struct PacketIds(Vec<u16>);

impl PacketIds {
    /// Adds `id`; false if it was there already.
    fn insert(&mut self, id: u16) -> bool {
        match self.0.binary_search(&id) {
            Ok(_) => false,
            Err(at) => {
                self.0.insert(at, id);
                true
            }
        }
    }

    /// Removes `id`; false if it was not there.
    fn remove(&mut self, id: u16) -> bool {
        match self.0.binary_search(&id) {
            Ok(at) => {
                self.0.remove(at);
                true
            }
            Err(_) => false,
        }
    }

    fn contains(&self, id: u16) -> bool {
        self.0.binary_search(&id).is_ok()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    /// Frees the vector once it is empty (an idle connection holds none).
    fn release_idle_memory(&mut self) {
        if self.0.is_empty() && self.0.capacity() > 0 {
            self.0 = Vec::new();
        }
    }
}

/// What a CONNECT leaves for its CONNACK while the gateway decides.
#[derive(Debug)]
struct PendingConnect {
    clean_start: bool,
    /// The keepalive in force, and (MQTT 5) the one asked for.
    keep_alive_secs: u16,
    requested_keep_alive_secs: u16,
    /// MQTT 5: returned as the Assigned Client Identifier.
    assigned_client_id: Option<String>,
}

/// The server side of one MQTT connection.
#[derive(Debug)]
pub struct Session {
    limits: SessionLimits,
    /// 3.1.1 until CONNECT says otherwise; decides how later packets parse and are answered.
    version: ProtocolVersion,
    phase: Phase,
    /// Set while deciding (boxed: most of a connection's life does not need it).
    pending: Option<Box<PendingConnect>>,
    /// The connection resumed a stored session (Session Present = 1).
    resumed: bool,
    /// QoS 1/2 messages in the order received; acks leave in this order (MQTT 4.6).
    inflight: VecDeque<Inflight>,
    next_id: u64,
    /// QoS 2 packet ids whose PUBREC was sent and whose PUBREL has not arrived. A PUBLISH
    /// reusing one is a resend of a stored message: answered, not stored again.
    awaiting_rel: PacketIds,
    out: BytesMut,
    /// 1.5 × the keepalive in force; `None` when there is none (3.1.1 keepalive 0).
    keepalive: Option<Duration>,
    /// When the device last sent bytes (or weir last resumed reading it).
    last_activity: Instant,
    /// When the connection times out unless the device sends something.
    deadline: Option<Instant>,
    /// MQTT 5: the largest packet the device accepts (a u32 as on the wire: a usize would
    /// make every connection's task 8 bytes larger, see gateway/src/listener/mod.rs's size
    /// guard).
    client_max_packet_size: u32,
    /// MQTT 5: whether the device wants Reason Strings and User Properties on acks.
    problem_information: bool,
    /// MQTT 5: the Session Expiry Interval of the CONNECT (a DISCONNECT may not raise it from 0).
    session_expiry_requested: u32,
    /// MQTT 5: topic alias n is `topic_aliases[n - 1]`.
    topic_aliases: Vec<Option<String>>,
    alias_table_bytes: usize,
    /// The gateway is shutting down: CONNECT is refused with server busy.
    shutting_down: bool,
    /// Packets not sent because they exceed the device's Maximum Packet Size even without
    /// diagnostics.
    unsendable: u64,
}

impl Session {
    /// A session for a connection opened at `now`; CONNECT is due by the connect timeout.
    pub fn new(limits: SessionLimits, now: Instant) -> Self {
        Self {
            limits,
            version: ProtocolVersion::V311,
            phase: Phase::Connecting,
            pending: None,
            resumed: false,
            inflight: VecDeque::new(),
            next_id: 0,
            awaiting_rel: PacketIds::default(),
            out: BytesMut::new(),
            keepalive: None,
            last_activity: now,
            deadline: Some(now + limits.connect_timeout),
            client_max_packet_size: u32::MAX,
            problem_information: true,
            session_expiry_requested: 0,
            topic_aliases: Vec::new(),
            alias_table_bytes: 0,
            shutting_down: false,
            unsendable: 0,
        }
    }

    /// How the next packet from the device must be decoded (its protocol version and limits).
    pub fn decoder(&self) -> Decoder {
        Decoder {
            version: self.version,
            max_packet_size: self.limits.max_packet_size,
            max_user_properties: self.limits.max_user_properties,
        }
    }

    /// The connection's protocol version (3.1.1 until CONNECT).
    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    /// Records that the device was heard from at `now`, or that weir resumes reading it after
    /// holding it back (time spent under backpressure is weir's doing, never the device's).
    pub fn note_activity(&mut self, now: Instant) {
        self.last_activity = now;
        if self.phase == Phase::Connected {
            self.deadline = self.keepalive.map(|k| now + k);
        }
    }

    /// When the connection must close if nothing arrives: the connect deadline until the
    /// CONNECT is accepted (deciding included), 1.5 × keepalive after the last activity once
    /// connected, or never (keepalive 0).
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The violation for a deadline that passed; an MQTT 5 device is told 0x8D first. While
    /// the gateway is still deciding, the device is refused "server unavailable" (MQTT 5 0x88,
    /// 3.1.1 0x03): the delay was weir's, not the device's.
    pub fn timed_out(&mut self) -> Violation {
        let violation = match self.phase {
            Phase::Connected => Violation::KeepaliveTimeout,
            Phase::Connecting | Phase::Refused => Violation::ConnectTimeout,
            Phase::Deciding => {
                self.pending = None;
                self.phase = Phase::Refused;
                let violation = Violation::DecisionTimeout;
                if self.version.is_v5() {
                    self.refuse_connect_v5(&violation);
                } else {
                    self.write_connack(ConnectReturnCode::ServerUnavailable);
                }
                return violation;
            }
        };
        self.announce(&violation);
        violation
    }

    /// Whether the connection may read the next packet: never while a CONNECT awaits its
    /// decision. For MQTT 3.1.1, false while the in-flight window is full: the socket is left
    /// unread so the device's writes block. MQTT 5 devices are always read: their Receive
    /// Maximum holds them back, and a PINGREQ sent meanwhile is answered.
    pub fn can_read(&self) -> bool {
        matches!(self.phase, Phase::Connecting | Phase::Connected)
            && (self.version.is_v5() || self.window_used() < self.limits.max_inflight)
    }

    /// Whether a CONNECT awaits the gateway's [`Session::decide`].
    pub fn is_deciding(&self) -> bool {
        self.phase == Phase::Deciding
    }

    /// Answers the CONNECT reported by [`Event::Connect`], at `now` (the keepalive starts
    /// then: time spent deciding is weir's, not the device's). Accepting queues the CONNACK;
    /// refusing queues a CONNACK with the refusal's code and returns the violation that closes
    /// the connection. Without a CONNECT awaiting a decision it does nothing.
    pub fn decide(&mut self, decision: ConnectDecision, now: Instant) -> Result<(), Violation> {
        if self.phase != Phase::Deciding {
            return Ok(());
        }
        let Some(pending) = self.pending.take() else { return Ok(()) };
        match decision {
            ConnectDecision::Refuse(refusal) => {
                self.phase = Phase::Refused;
                let violation = Violation::ConnectRefused(refusal);
                if self.version.is_v5() {
                    self.refuse_connect_v5(&violation);
                } else {
                    self.write_connack(refusal.return_code());
                }
                Err(violation)
            }
            ConnectDecision::Accept { session_present, session_expiry_secs } => {
                // [MQTT-3.2.2-2]: Clean Start never resumes a session.
                let session_present = session_present && !pending.clean_start;
                self.phase = Phase::Connected;
                self.resumed = session_present;
                self.last_activity = now;
                self.set_keepalive(pending.keep_alive_secs);
                if !self.version.is_v5() {
                    self.write(Packet::ConnAck(ConnAck {
                        session_present,
                        code: ConnectReturnCode::Accepted,
                    }));
                    return Ok(());
                }
                let PendingConnect { keep_alive_secs, requested_keep_alive_secs, assigned_client_id, .. } =
                    *pending;
                let requested_expiry = self.session_expiry_requested;
                let advertised = Properties {
                    receive_maximum: Some(u16::try_from(self.limits.max_inflight).unwrap_or(u16::MAX)),
                    maximum_packet_size: Some(u32::try_from(self.limits.max_packet_size).unwrap_or(u32::MAX)),
                    topic_alias_maximum: (self.limits.max_topic_aliases > 0)
                        .then_some(self.limits.max_topic_aliases),
                    assigned_client_identifier: assigned_client_id,
                    server_keep_alive: (keep_alive_secs != requested_keep_alive_secs)
                        .then_some(keep_alive_secs),
                    session_expiry_interval: (session_expiry_secs != requested_expiry)
                        .then_some(session_expiry_secs),
                    ..Properties::default()
                };
                self.write(Packet::ConnAckV5(ConnAckV5 {
                    session_present,
                    reason: ReasonCode::Success,
                    properties: advertised,
                }));
                Ok(())
            }
        }
    }

    /// Another connection with the same client id was accepted: this one must go. MQTT 5 is
    /// told DISCONNECT 0x8E first [MQTT-3.1.4-3]; 3.1.1 is just closed.
    pub fn taken_over(&mut self) -> Violation {
        let violation = Violation::SessionTakenOver;
        self.announce(&violation);
        violation
    }

    /// Panics unless the session's bookkeeping is consistent; the fuzz harness
    /// (`crate::fuzzing`) calls it after every step.
    pub(crate) fn assert_invariants(&self) {
        let used = self.window_used();
        assert!(used <= self.limits.max_inflight, "{used} in the window of {}", self.limits.max_inflight);
        // `entry` finds an id by its distance from the front: ids must be consecutive.
        if let Some(front) = self.inflight.front() {
            for (offset, entry) in (0u64..).zip(&self.inflight) {
                assert_eq!(entry.id, front.id + offset, "in-flight ids are not consecutive");
            }
        }
        if let Some(back) = self.inflight.back() {
            assert_eq!(back.id + 1, self.next_id, "the newest in-flight id is not the last one given");
        }
        let alias_bytes: usize = self.topic_aliases.iter().flatten().map(String::len).sum();
        assert_eq!(alias_bytes, self.alias_table_bytes, "alias table bytes miscounted");
        assert!(alias_bytes <= MAX_ALIAS_TABLE_BYTES);
        assert!(self.topic_aliases.len() <= usize::from(self.limits.max_topic_aliases));
        assert_eq!(
            self.phase == Phase::Deciding,
            self.pending.is_some(),
            "pending CONNECT in {:?}",
            self.phase
        );
        match self.phase {
            Phase::Connected => {
                assert_eq!(
                    self.deadline,
                    self.keepalive.map(|k| self.last_activity + k),
                    "keepalive deadline"
                )
            }
            _ => assert!(self.deadline.is_some(), "no connect deadline in {:?}", self.phase),
        }
    }

    /// The credentials the connection was accepted with (a token) have expired: it must go.
    /// MQTT 5 is told DISCONNECT 0xA0 (maximum connect time) first; 3.1.1 is just closed.
    pub fn credentials_expired(&mut self) -> Violation {
        let violation = Violation::CredentialsExpired;
        self.announce(&violation);
        violation
    }

    /// A message the device may not publish, with no ack to carry the refusal (QoS 0, or any
    /// QoS on 3.1.1, which has no error ack): the connection must go. MQTT 5 is told DISCONNECT
    /// 0x87 (not authorized) first; 3.1.1 is just closed [MQTT-3.3.5-2].
    pub fn not_authorized(&mut self) -> Violation {
        let violation = Violation::NotAuthorized;
        self.announce(&violation);
        violation
    }

    fn window_used(&self) -> usize {
        self.inflight.len() + self.awaiting_rel.len()
    }

    /// QoS 1/2 messages still waiting for their outcome.
    pub fn pending(&self) -> usize {
        self.inflight.len()
    }

    pub fn is_connected(&self) -> bool {
        self.phase == Phase::Connected
    }

    /// Packets that were not sent because they exceed the device's Maximum Packet Size.
    pub fn unsendable(&self) -> u64 {
        self.unsendable
    }

    /// Encoded packets waiting to be written; the caller writes and clears them.
    pub fn outgoing(&mut self) -> &mut BytesMut {
        &mut self.out
    }

    /// Gives back the room that busy moments left in the session's buffers once they are empty,
    /// so an idle connection holds only its state. Call it when the connection goes idle.
    pub fn release_idle_memory(&mut self) {
        if self.out.is_empty() && self.out.capacity() > 0 {
            self.out = BytesMut::new();
        }
        if self.inflight.is_empty() && self.inflight.capacity() > 0 {
            self.inflight = VecDeque::new();
        }
        self.awaiting_rel.release_idle_memory();
    }

    /// The gateway is shutting down at `now`. A CONNECT from now on is answered server busy
    /// (MQTT 5 0x89, 3.1.1 0x03); a connection still without CONNECT gets at most `grace` more
    /// to send it.
    pub fn begin_shutdown(&mut self, now: Instant, grace: Duration) {
        self.shutting_down = true;
        if self.phase != Phase::Connected {
            let cap = now + grace;
            self.deadline = Some(self.deadline.map_or(cap, |d| d.min(cap)));
        }
    }

    /// Queues the goodbye for a connection that shutdown closes after its last ack: DISCONNECT
    /// 0x8B (server shutting down) for MQTT 5; 3.1.1 has no server DISCONNECT.
    pub fn say_goodbye(&mut self) {
        if self.phase == Phase::Connected && self.version.is_v5() {
            self.write(Packet::DisconnectV5(DisconnectV5::with_reason_string(
                ReasonCode::ServerShuttingDown,
                "weir is shutting down; reconnect later",
            )));
        }
    }

    /// Handles a decode error: queues the answer the spec requires (CONNACK 0x01 for an
    /// unsupported protocol level on CONNECT; MQTT 5: DISCONNECT with the error's reason code)
    /// and says why the connection closes.
    pub fn on_decode_error(&mut self, error: DecodeError) -> Violation {
        let violation = match error {
            DecodeError::UnsupportedProtocolLevel(level) if self.phase == Phase::Connecting => {
                self.write_connack(ConnectReturnCode::UnacceptableProtocolVersion);
                Violation::UnsupportedProtocolLevel(level)
            }
            other => Violation::Malformed(other),
        };
        self.announce(&violation);
        violation
    }

    /// Handles one decoded packet from the device.
    pub fn on_packet(&mut self, packet: Packet, connection_id: u64) -> Result<Event, Violation> {
        let result = self.handle(packet, connection_id);
        if let Err(violation) = &result {
            self.announce(violation);
        }
        result
    }

    fn handle(&mut self, packet: Packet, connection_id: u64) -> Result<Event, Violation> {
        match self.phase {
            Phase::Connecting => {
                return match packet {
                    Packet::Connect(connect) => self.on_connect(connect, connection_id),
                    Packet::ConnectV5(connect) => self.on_connect_v5(*connect, connection_id),
                    _ => Err(Violation::NotConnected),
                }
            }
            // The caller reads nothing while deciding or once refused (`can_read`); a packet
            // handed in anyway is not processed.
            Phase::Deciding | Phase::Refused => {
                return Err(Violation::ProtocolError("a packet before an accepting CONNACK"))
            }
            Phase::Connected => {}
        }
        match packet {
            Packet::Publish(publish) => self.on_publish(publish, None),
            Packet::PublishV5(publish) => self.on_publish_v5(publish),
            Packet::PubRel(pkid) => {
                // Known or not (an id of the session's previous connection, before a restart or
                // a takeover), it is completed: weir sends PUBREC only after the commit, so the
                // message is stored.
                self.awaiting_rel.remove(pkid);
                self.write(Packet::PubComp(pkid));
                Ok(Event::None)
            }
            Packet::PubRelV5(rel) => {
                // A resumed session may release ids of its previous connection (before a
                // restart or a takeover), which this one never saw. weir sent their PUBREC only
                // after the commit, so those messages are stored: complete them.
                let reason = if self.awaiting_rel.remove(rel.pkid) || self.resumed {
                    ReasonCode::Success
                } else {
                    ReasonCode::PacketIdentifierNotFound
                };
                let properties = Properties::default();
                self.write(Packet::PubCompV5(AckV5 { pkid: rel.pkid, reason, properties }));
                Ok(Event::None)
            }
            Packet::Subscribe(subscribe) => {
                // weir ingests; it is not a broker. Refuse every filter, keep the connection.
                let return_codes = vec![SubAck::FAILURE; subscribe.filters.len()];
                self.write(Packet::SubAck(SubAck { pkid: subscribe.pkid, return_codes }));
                Ok(Event::None)
            }
            Packet::SubscribeV5(subscribe) => {
                let reason_codes = vec![ReasonCode::ImplementationSpecificError; subscribe.filters.len()];
                let properties =
                    reason_string("weir ingests telemetry; it delivers no messages to subscribers");
                self.write(Packet::SubAckV5(SubAckV5 { pkid: subscribe.pkid, properties, reason_codes }));
                Ok(Event::None)
            }
            Packet::Unsubscribe(unsubscribe) => {
                self.write(Packet::UnsubAck(unsubscribe.pkid));
                Ok(Event::None)
            }
            Packet::UnsubscribeV5(unsubscribe) => {
                let reason_codes =
                    vec![ReasonCode::NoSubscriptionExisted; unsubscribe.unsubscribe.filters.len()];
                let pkid = unsubscribe.unsubscribe.pkid;
                self.write(Packet::UnsubAckV5(UnsubAckV5 {
                    pkid,
                    properties: Properties::default(),
                    reason_codes,
                }));
                Ok(Event::None)
            }
            Packet::PingReq => {
                self.write(Packet::PingResp);
                Ok(Event::None)
            }
            Packet::Disconnect => Ok(Event::Disconnect { session_expiry_secs: None }),
            Packet::DisconnectV5(disconnect) => {
                let raised = disconnect.properties.session_expiry_interval.is_some_and(|s| s > 0);
                if self.session_expiry_requested == 0 && raised {
                    // [MQTT-3.14.2-2]
                    return Err(Violation::ProtocolError(
                        "DISCONNECT set a session expiry after CONNECT set none",
                    ));
                }
                Ok(Event::Disconnect { session_expiry_secs: disconnect.properties.session_expiry_interval })
            }
            Packet::Auth(_) => {
                Err(Violation::ProtocolError("AUTH without an authentication method in CONNECT"))
            }
            // weir never publishes to devices, so there is nothing for these to acknowledge.
            Packet::PubAck(_)
            | Packet::PubRec(_)
            | Packet::PubComp(_)
            | Packet::PubAckV5(_)
            | Packet::PubRecV5(_)
            | Packet::PubCompV5(_) => Ok(Event::None),
            Packet::Connect(_) | Packet::ConnectV5(_) => Err(Violation::DuplicateConnect),
            Packet::ConnAck(_) | Packet::ConnAckV5(_) => Err(Violation::UnexpectedPacket("CONNACK")),
            Packet::SubAck(_) | Packet::SubAckV5(_) => Err(Violation::UnexpectedPacket("SUBACK")),
            Packet::UnsubAck(_) | Packet::UnsubAckV5(_) => Err(Violation::UnexpectedPacket("UNSUBACK")),
            Packet::PingResp => Err(Violation::UnexpectedPacket("PINGRESP")),
        }
    }

    /// Records that the payload of in-flight message `id` did not decode and was dead-lettered:
    /// once the dead letter is stored, an MQTT 5 device gets 0x99 with `reason` (3.1.1: a plain
    /// ack, as the dead letter is safe).
    pub fn note_undecodable(&mut self, id: InflightId, reason: String) {
        if let Some(entry) = self.entry(id) {
            entry.undecodable = Some(reason);
        }
    }

    /// Answers in-flight message `id` with `refusal` instead of storing it (in order with the
    /// other acks). For 3.1.1, which has no error ack, the connection closes.
    pub fn refuse(&mut self, id: InflightId, refusal: Refusal) -> Result<(), Violation> {
        if let Some(entry) = self.entry(id) {
            entry.refusal = Some(refusal);
            entry.outcome = Some(Outcome::Stored);
        }
        self.release_acks()
    }

    /// Records the outcome of an in-flight message and queues every acknowledgement that is now
    /// due, in receive order. A failed message closes the connection unacknowledged.
    pub fn complete(&mut self, id: InflightId, outcome: Outcome) -> Result<(), Violation> {
        if let Some(entry) = self.entry(id) {
            entry.outcome = Some(outcome);
        }
        self.release_acks()
    }

    fn entry(&mut self, id: InflightId) -> Option<&mut Inflight> {
        let front = self.inflight.front()?.id;
        let index = id.0.checked_sub(front)?;
        self.inflight.get_mut(usize::try_from(index).ok()?)
    }

    fn release_acks(&mut self) -> Result<(), Violation> {
        while let Some(entry) = self.inflight.front() {
            let Some(outcome) = entry.outcome else { break };
            let Some(entry) = self.inflight.pop_front() else { break };
            let (pkid, qos) = (entry.pkid, entry.qos);
            if outcome == Outcome::Failed {
                let violation = Violation::StoreFailed(qos as u8);
                self.announce(&violation);
                return Err(violation);
            }
            let (reason, text) = match (entry.refusal, outcome, entry.undecodable) {
                (Some(Refusal::NotAuthorized), _, _) => {
                    (ReasonCode::NotAuthorized, "not authorized to publish to this topic".to_owned())
                }
                (None, Outcome::Dropped, _) => (
                    ReasonCode::QuotaExceeded,
                    "dropped: the gateway is full (when_full = drop_newest)".to_owned(),
                ),
                (None, _, Some(reason)) => {
                    (ReasonCode::PayloadFormatInvalid, format!("stored as a dead letter: {reason}"))
                }
                (None, _, None) => (ReasonCode::Success, String::new()),
            };
            if !self.version.is_v5() {
                if reason == ReasonCode::NotAuthorized {
                    let violation = Violation::NotAuthorized;
                    self.announce(&violation);
                    return Err(violation);
                }
                if qos == QoS::ExactlyOnce {
                    self.awaiting_rel.insert(pkid);
                    self.write(Packet::PubRec(pkid));
                } else {
                    self.write(Packet::PubAck(pkid));
                }
                continue;
            }
            let properties = if text.is_empty() { Properties::default() } else { reason_string(text) };
            let ack = AckV5 { pkid, reason, properties };
            if qos == QoS::ExactlyOnce {
                // A PUBREC with an error code ends the QoS 2 exchange: no PUBREL follows.
                if !reason.is_error() {
                    self.awaiting_rel.insert(pkid);
                }
                self.write(Packet::PubRecV5(ack));
            } else {
                self.write(Packet::PubAckV5(ack));
            }
        }
        Ok(())
    }

    fn on_connect(&mut self, connect: Connect, connection_id: u64) -> Result<Event, Violation> {
        self.version = if connect.protocol_level == 3 { ProtocolVersion::V31 } else { ProtocolVersion::V311 };
        if self.shutting_down {
            self.write_connack(ConnectReturnCode::ServerUnavailable);
            return Err(Violation::ServerBusy);
        }
        let mut client_id = connect.client_id;
        let mut assigned = false;
        if client_id.is_empty() {
            if !connect.clean_session {
                // MQTT 3.1.1 3.1.3-8: a persistent session needs a client id.
                return Err(self.reject_client_id("empty client id with clean session 0"));
            }
            client_id = format!("weir-auto-{connection_id}");
            assigned = true;
        }
        if let Err(reason) = self.check_client_id(&client_id) {
            return Err(self.reject_client_id(reason));
        }
        // MQTT 3.1.1 3.1.2.10: the server allows one and a half keepalive periods of silence
        // (from the CONNACK on). A device that cannot be told a shorter keepalive is held to
        // the maximum silently.
        let keep_alive_secs = self.granted_keepalive(connect.keep_alive_secs);
        self.phase = Phase::Deciding;
        self.pending = Some(Box::new(PendingConnect {
            clean_start: connect.clean_session,
            keep_alive_secs,
            requested_keep_alive_secs: connect.keep_alive_secs,
            assigned_client_id: None,
        }));
        Ok(Event::Connect(Box::new(ConnectRequest {
            client_id,
            assigned,
            version: self.version,
            clean_start: connect.clean_session,
            session_expiry_secs: None,
            keep_alive_secs,
            username: connect.username,
            password: connect.password,
        })))
    }

    fn on_connect_v5(&mut self, connect: ConnectV5, connection_id: u64) -> Result<Event, Violation> {
        self.version = ProtocolVersion::V5;
        let ConnectV5 { connect, properties, .. } = connect;
        // The device's limits apply to everything weir sends it, a refusing CONNACK included.
        if let Some(max) = properties.maximum_packet_size {
            self.client_max_packet_size = max;
        }
        self.problem_information = properties.request_problem_information != Some(0);
        if self.shutting_down {
            return Err(self.refuse_connect_v5(&Violation::ServerBusy));
        }
        if let Some(method) = properties.authentication_method {
            return Err(self.refuse_connect_v5(&Violation::BadAuthenticationMethod(method)));
        }
        let mut client_id = connect.client_id;
        let assigned = client_id.is_empty();
        if assigned {
            // MQTT 5 lets the server assign one whatever Clean Start says; it is returned as
            // the Assigned Client Identifier.
            client_id = format!("weir-auto-{connection_id}");
        }
        if let Err(reason) = self.check_client_id(&client_id) {
            return Err(self.refuse_connect_v5(&Violation::ClientIdRejected(reason)));
        }
        let requested = connect.keep_alive_secs;
        let keep_alive_secs = self.granted_keepalive(requested);
        self.session_expiry_requested = properties.session_expiry_interval.unwrap_or(0);
        self.phase = Phase::Deciding;
        self.pending = Some(Box::new(PendingConnect {
            clean_start: connect.clean_session,
            keep_alive_secs,
            requested_keep_alive_secs: requested,
            assigned_client_id: assigned.then(|| client_id.clone()),
        }));
        Ok(Event::Connect(Box::new(ConnectRequest {
            client_id,
            assigned,
            version: self.version,
            clean_start: connect.clean_session,
            session_expiry_secs: Some(self.session_expiry_requested),
            keep_alive_secs,
            username: connect.username,
            password: connect.password,
        })))
    }

    fn check_client_id(&self, client_id: &str) -> Result<(), &'static str> {
        if client_id.len() > self.limits.max_client_id_len {
            return Err("longer than the limit");
        }
        if client_id.contains(['+', '#', '/']) || client_id.chars().any(char::is_control) {
            return Err("contains a wildcard, '/' or a control character");
        }
        Ok(())
    }

    /// The keepalive a device asking for `requested` gets: at most `max_keepalive_secs`, and
    /// that when it asked for none.
    fn granted_keepalive(&self, requested: u16) -> u16 {
        let max = self.limits.max_keepalive_secs;
        if max > 0 && (requested == 0 || requested > max) {
            max
        } else {
            requested
        }
    }

    /// Refuses a topic name beyond the configured length or depth.
    fn check_topic(&self, topic: &str) -> Result<(), Violation> {
        let (max_bytes, max_levels) = (self.limits.max_topic_bytes, self.limits.max_topic_levels);
        let levels = || topic.bytes().filter(|&b| b == b'/').count() + 1;
        if topic.len() > max_bytes || levels() > max_levels {
            return Err(Violation::TopicTooLong {
                bytes: topic.len(),
                levels: levels(),
                max_bytes,
                max_levels,
            });
        }
        Ok(())
    }

    fn set_keepalive(&mut self, keep_alive_secs: u16) {
        self.keepalive =
            (keep_alive_secs > 0).then(|| Duration::from_millis(u64::from(keep_alive_secs) * 1500));
        self.deadline = self.keepalive.map(|k| self.last_activity + k);
    }

    /// Queues an MQTT 5 CONNACK refusing the connection for `violation`.
    fn refuse_connect_v5(&mut self, violation: &Violation) -> Violation {
        let reason = violation.reason_code().unwrap_or(ReasonCode::UnspecifiedError);
        self.write(Packet::ConnAckV5(ConnAckV5 {
            session_present: false,
            reason,
            properties: reason_string(violation.to_string()),
        }));
        violation.clone()
    }

    fn on_publish_v5(&mut self, publish: PublishV5) -> Result<Event, Violation> {
        let PublishV5 { mut publish, properties } = publish;
        if !properties.subscription_identifiers.is_empty() {
            return Err(Violation::ProtocolError("a client PUBLISH carried a subscription identifier"));
        }
        if let Some(alias) = properties.topic_alias {
            let max = self.limits.max_topic_aliases;
            if alias == 0 || alias > max {
                return Err(Violation::TopicAliasInvalid { alias, max });
            }
            let slot = usize::from(alias - 1);
            // Checked before it is kept as an alias (and again, resolved, below).
            self.check_topic(&publish.topic)?;
            if publish.topic.is_empty() {
                match self.topic_aliases.get(slot).and_then(Option::as_ref) {
                    Some(topic) => publish.topic = topic.clone(),
                    None => return Err(Violation::UnknownTopicAlias(alias)),
                }
            } else {
                self.define_alias(slot, &publish.topic)?;
            }
        }
        self.on_publish(publish, payload_format(&properties))
    }

    fn define_alias(&mut self, slot: usize, topic: &str) -> Result<(), Violation> {
        if self.topic_aliases.len() <= slot {
            self.topic_aliases.resize(slot + 1, None);
        }
        let old_len = match &self.topic_aliases[slot] {
            Some(old) if old == topic => return Ok(()),
            Some(old) => old.len(),
            None => 0,
        };
        let bytes = self.alias_table_bytes - old_len + topic.len();
        if bytes > MAX_ALIAS_TABLE_BYTES {
            return Err(Violation::AliasTableFull);
        }
        self.alias_table_bytes = bytes;
        self.topic_aliases[slot] = Some(topic.to_owned());
        Ok(())
    }

    fn on_publish(&mut self, publish: Publish, format: Option<PayloadFormat>) -> Result<Event, Violation> {
        let Publish { qos, pkid, topic, payload, .. } = publish;
        self.check_topic(&topic)?;
        if qos == QoS::ExactlyOnce {
            if self.awaiting_rel.contains(pkid) {
                // Already stored and PUBREC sent; the device missed it. Answer again, store once.
                let rec = if self.version.is_v5() {
                    Packet::PubRecV5(AckV5::success(pkid))
                } else {
                    Packet::PubRec(pkid)
                };
                self.write(rec);
                return Ok(Event::None);
            }
            if self.inflight.iter().any(|e| e.pkid == pkid && e.qos == QoS::ExactlyOnce) {
                // A resend of a message still being stored; its PUBREC follows the commit.
                return Ok(Event::None);
            }
        }
        if qos != QoS::AtMostOnce && self.version.is_v5() && self.window_used() >= self.limits.max_inflight {
            return Err(Violation::ReceiveMaximumExceeded(self.limits.max_inflight));
        }
        let ack = (qos != QoS::AtMostOnce).then(|| {
            let id = self.next_id;
            self.next_id += 1;
            self.inflight.push_back(Inflight {
                id,
                pkid,
                qos,
                outcome: None,
                refusal: None,
                undecodable: None,
            });
            InflightId(id)
        });
        Ok(Event::Publish { topic, payload, qos, ack, format })
    }

    fn reject_client_id(&mut self, reason: &'static str) -> Violation {
        self.write_connack(ConnectReturnCode::IdentifierRejected);
        Violation::ClientIdRejected(reason)
    }

    fn write_connack(&mut self, code: ConnectReturnCode) {
        self.write(Packet::ConnAck(ConnAck { session_present: false, code }));
    }

    /// Queues the MQTT 5 DISCONNECT that announces `violation` on an accepted connection.
    fn announce(&mut self, violation: &Violation) {
        if !(self.phase == Phase::Connected && self.version.is_v5()) {
            return;
        }
        if let Some(reason) = violation.reason_code() {
            self.write(Packet::DisconnectV5(DisconnectV5::with_reason_string(reason, violation.to_string())));
        }
    }

    /// Encodes `packet` for the device. For MQTT 5, Reason Strings and User Properties are left
    /// out when the device asked for no problem information (except on CONNACK and DISCONNECT)
    /// or when they would take the packet over the device's Maximum Packet Size; a packet still
    /// too large is not sent at all [MQTT-3.1.2-24].
    fn write(&mut self, mut packet: Packet) {
        if self.version.is_v5() {
            let always_diagnosed = matches!(packet, Packet::ConnAckV5(_) | Packet::DisconnectV5(_));
            if !self.problem_information && !always_diagnosed {
                if let Some(properties) = packet.properties_mut() {
                    properties.strip_diagnostics();
                }
            }
            let client_max = usize::try_from(self.client_max_packet_size).unwrap_or(usize::MAX);
            if encoded_len(&packet) > client_max {
                if let Some(properties) = packet.properties_mut() {
                    properties.strip_diagnostics();
                }
                if encoded_len(&packet) > client_max {
                    self.unsendable += 1;
                    return;
                }
            }
        }
        encode(&packet, &mut self.out);
    }
}

fn reason_string(text: impl Into<String>) -> Properties {
    Properties { reason_string: Some(text.into()), ..Properties::default() }
}

/// The payload decoder an MQTT 5 PUBLISH asks for: its Content Type when weir knows it
/// (application/json; application/x-protobuf, application/protobuf,
/// application/vnd.google.protobuf; parameters such as `; charset=utf-8` ignored), else JSON
/// when the Payload Format Indicator says UTF-8 text, else none (the listener's setting).
pub fn payload_format(properties: &Properties) -> Option<PayloadFormat> {
    if let Some(content_type) = &properties.content_type {
        let essence = content_type.split(';').next().unwrap_or_default().trim();
        if essence.eq_ignore_ascii_case("application/json") {
            return Some(PayloadFormat::Json);
        }
        let protobuf = ["application/x-protobuf", "application/protobuf", "application/vnd.google.protobuf"];
        if protobuf.iter().any(|known| essence.eq_ignore_ascii_case(known)) {
            return Some(PayloadFormat::Protobuf);
        }
    }
    (properties.payload_format_indicator == Some(1)).then_some(PayloadFormat::Json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::{Subscribe, SubscribeV5, SubscriptionOptions, Unsubscribe, UnsubscribeV5};

    proptest::proptest! {
        /// The sorted vector behaves as a set of ids, whatever the order of operations.
        #[test]
        fn packet_ids_behave_as_a_set(ops in proptest::collection::vec((0u8..3, 0u16..64), 0..200)) {
            let mut ids = PacketIds::default();
            let mut model = std::collections::BTreeSet::new();
            for (op, id) in ops {
                match op {
                    0 => proptest::prop_assert_eq!(ids.insert(id), model.insert(id)),
                    1 => proptest::prop_assert_eq!(ids.remove(id), model.remove(&id)),
                    _ => proptest::prop_assert_eq!(ids.contains(id), model.contains(&id)),
                }
                proptest::prop_assert_eq!(ids.len(), model.len());
            }
            ids.release_idle_memory();
            proptest::prop_assert_eq!(ids.0.capacity() == 0, model.is_empty());
        }
    }

    fn connect(client_id: &str, clean_session: bool) -> Packet {
        Packet::Connect(Connect {
            protocol_level: 4,
            clean_session,
            keep_alive_secs: 30,
            client_id: client_id.into(),
            will: None,
            username: None,
            password: None,
        })
    }

    fn publish(qos: QoS, pkid: u16) -> Packet {
        Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: "t".into(),
            pkid,
            payload: Bytes::from_static(b"{}"),
        })
    }

    /// Decodes everything the session queued for writing, as a client of its version would.
    fn written(session: &mut Session) -> Vec<Packet> {
        let decoder = Decoder::new(session.version(), 1 << 20);
        let mut packets = Vec::new();
        let out = session.outgoing();
        while let Some(p) = decoder.decode(out).unwrap() {
            packets.push(p);
        }
        assert!(out.is_empty());
        packets
    }

    /// Accepts the CONNECT awaiting its decision, with no session present.
    fn accept(s: &mut Session, now: Instant) {
        s.decide(ConnectDecision::Accept { session_present: false, session_expiry_secs: 0 }, now).unwrap();
    }

    fn connected() -> Session {
        let mut s = Session::new(
            SessionLimits { max_inflight: 3, max_client_id_len: 8, ..SessionLimits::default() },
            Instant::now(),
        );
        s.on_packet(connect("dev", true), 1).unwrap();
        accept(&mut s, Instant::now());
        written(&mut s);
        s
    }

    fn request(event: Event) -> ConnectRequest {
        match event {
            Event::Connect(request) => *request,
            other => panic!("expected a CONNECT to decide, got {other:?}"),
        }
    }

    fn ack_id(event: Event) -> InflightId {
        match event {
            Event::Publish { ack: Some(id), .. } => id,
            other => panic!("expected an acked publish, got {other:?}"),
        }
    }

    fn connack(code: ConnectReturnCode) -> Packet {
        Packet::ConnAck(ConnAck { session_present: false, code })
    }

    #[test]
    fn connect_is_accepted_and_empty_id_assigned() {
        let mut s = Session::new(SessionLimits::default(), Instant::now());
        let event = s.on_packet(connect("", true), 42).unwrap();
        assert_eq!(
            request(event),
            ConnectRequest {
                client_id: "weir-auto-42".into(),
                assigned: true,
                version: ProtocolVersion::V311,
                clean_start: true,
                session_expiry_secs: None,
                keep_alive_secs: 30,
                username: None,
                password: None,
            }
        );
        assert!(written(&mut s).is_empty(), "no CONNACK before the decision");
        accept(&mut s, Instant::now());
        assert_eq!(written(&mut s), [connack(ConnectReturnCode::Accepted)]);
    }

    #[test]
    fn nothing_is_processed_while_the_connect_awaits_its_decision() {
        let mut s = Session::new(SessionLimits::default(), Instant::now());
        let Packet::Connect(mut c) = connect("dev", false) else { unreachable!() };
        c.username = Some("user".into());
        c.password = Some(Bytes::from_static(b"secret"));
        let request = request(s.on_packet(Packet::Connect(c), 1).unwrap());
        assert_eq!((request.clean_start, request.username.as_deref()), (false, Some("user")));
        assert!(!format!("{request:?}").contains("secret"), "the password stays out of logs");
        assert!(s.is_deciding() && !s.is_connected());
        assert!(!s.can_read(), "the connection stops reading until the decision");
        assert!(s.on_packet(publish(QoS::AtLeastOnce, 1), 1).is_err(), "a packet handed in anyway");
        assert!(written(&mut s).is_empty());

        s.decide(ConnectDecision::Accept { session_present: true, session_expiry_secs: 0 }, Instant::now())
            .unwrap();
        assert_eq!(
            written(&mut s),
            [Packet::ConnAck(ConnAck { session_present: true, code: ConnectReturnCode::Accepted })]
        );
        assert!(s.can_read() && s.is_connected());
        // A second decision changes nothing.
        accept(&mut s, Instant::now());
        assert!(written(&mut s).is_empty());
    }

    #[test]
    fn clean_session_is_never_present() {
        let mut s = Session::new(SessionLimits::default(), Instant::now());
        s.on_packet(connect("dev", true), 1).unwrap();
        s.decide(ConnectDecision::Accept { session_present: true, session_expiry_secs: 0 }, Instant::now())
            .unwrap();
        assert_eq!(written(&mut s), [connack(ConnectReturnCode::Accepted)]);
    }

    #[test]
    fn a_refusal_sends_its_code_and_closes() {
        let cases = [
            (ConnectRefusal::QuotaExceeded, ConnectReturnCode::ServerUnavailable, ReasonCode::QuotaExceeded),
            (
                ConnectRefusal::ServerUnavailable,
                ConnectReturnCode::ServerUnavailable,
                ReasonCode::ServerUnavailable,
            ),
            (
                ConnectRefusal::BadUserNameOrPassword,
                ConnectReturnCode::BadUsernameOrPassword,
                ReasonCode::BadUserNameOrPassword,
            ),
            (ConnectRefusal::NotAuthorized, ConnectReturnCode::NotAuthorized, ReasonCode::NotAuthorized),
            (ConnectRefusal::ServerBusy, ConnectReturnCode::ServerUnavailable, ReasonCode::ServerBusy),
        ];
        for (refusal, code, reason) in cases {
            let mut s = Session::new(SessionLimits::default(), Instant::now());
            s.on_packet(connect("dev", false), 1).unwrap();
            let violation = s.decide(ConnectDecision::Refuse(refusal), Instant::now()).unwrap_err();
            assert_eq!(violation, Violation::ConnectRefused(refusal));
            assert_eq!(written(&mut s), [connack(code)], "{refusal:?}");
            assert!(!s.is_connected() && !s.can_read());

            let mut s = Session::new(limits_v5(), Instant::now());
            s.on_packet(connect_v5("dev", 30, Properties::default()), 1).unwrap();
            let violation = s.decide(ConnectDecision::Refuse(refusal), Instant::now()).unwrap_err();
            assert_eq!(violation, Violation::ConnectRefused(refusal));
            let [Packet::ConnAckV5(connack)] = &written(&mut s)[..] else { panic!("CONNACK") };
            assert_eq!((connack.reason, connack.session_present), (reason, false), "{refusal:?}");
            assert!(connack.properties.reason_string.is_some());
            assert!(!s.is_connected());
        }
    }

    #[test]
    fn the_connect_deadline_runs_while_deciding() {
        let t0 = Instant::now();
        let limits = SessionLimits { connect_timeout: Duration::from_secs(2), ..SessionLimits::default() };
        let mut s = Session::new(limits, t0);
        s.on_packet(connect("dev", false), 1).unwrap();
        s.note_activity(t0 + Duration::from_secs(1));
        assert_eq!(s.deadline(), Some(t0 + Duration::from_secs(2)), "still the connect deadline");
        // No decision in time: the device is told the server is unavailable (weir's delay).
        assert_eq!(s.timed_out(), Violation::DecisionTimeout);
        assert_eq!(written(&mut s), [connack(ConnectReturnCode::ServerUnavailable)]);
        // A decision arriving late is ignored.
        accept(&mut s, t0 + Duration::from_secs(3));
        assert!(written(&mut s).is_empty());
        assert!(!s.is_connected());

        let mut s =
            Session::new(SessionLimits { connect_timeout: Duration::from_secs(2), ..limits_v5() }, t0);
        s.on_packet(connect_v5("dev", 30, Properties::default()), 1).unwrap();
        assert_eq!(s.timed_out(), Violation::DecisionTimeout);
        let [Packet::ConnAckV5(connack)] = &written(&mut s)[..] else { panic!("CONNACK") };
        assert_eq!(connack.reason, ReasonCode::ServerUnavailable);
    }

    #[test]
    fn taken_over_says_0x8e_to_v5_and_closes_v3_silently() {
        let mut s = connected_v5();
        assert_eq!(s.taken_over(), Violation::SessionTakenOver);
        assert_eq!(disconnect_sent(&mut s).0, ReasonCode::SessionTakenOver);
        let mut s = connected();
        assert_eq!(s.taken_over(), Violation::SessionTakenOver);
        assert!(written(&mut s).is_empty());
    }

    #[test]
    fn bad_client_ids_get_0x02() {
        for (id, clean) in [("", false), ("much-too-long", true), ("a/+", true), ("a#", true)] {
            let mut s = Session::new(
                SessionLimits { max_inflight: 3, max_client_id_len: 8, ..SessionLimits::default() },
                Instant::now(),
            );
            assert!(matches!(s.on_packet(connect(id, clean), 1), Err(Violation::ClientIdRejected(_))));
            assert_eq!(written(&mut s), [connack(ConnectReturnCode::IdentifierRejected)], "{id}");
        }
    }

    #[test]
    fn unsupported_level_gets_0x01_only_before_connect() {
        let mut s = Session::new(SessionLimits::default(), Instant::now());
        let v = s.on_decode_error(DecodeError::UnsupportedProtocolLevel(7));
        assert_eq!(v, Violation::UnsupportedProtocolLevel(7));
        assert_eq!(written(&mut s), [connack(ConnectReturnCode::UnacceptableProtocolVersion)]);
        let mut s = connected();
        let v = s.on_decode_error(DecodeError::ZeroLengthTopic);
        assert_eq!(v, Violation::Malformed(DecodeError::ZeroLengthTopic));
        assert!(written(&mut s).is_empty());
    }

    #[test]
    fn packets_before_connect_and_second_connect_close() {
        let mut s = Session::new(SessionLimits::default(), Instant::now());
        assert_eq!(s.on_packet(Packet::PingReq, 1), Err(Violation::NotConnected));
        let mut s = connected();
        assert_eq!(s.on_packet(connect("dev", true), 1), Err(Violation::DuplicateConnect));
    }

    #[test]
    fn acks_leave_in_receive_order_whatever_the_commit_order() {
        let mut s = connected();
        let a = ack_id(s.on_packet(publish(QoS::AtLeastOnce, 10), 1).unwrap());
        let b = ack_id(s.on_packet(publish(QoS::ExactlyOnce, 11), 1).unwrap());
        let c = ack_id(s.on_packet(publish(QoS::AtLeastOnce, 12), 1).unwrap());
        assert!(!s.can_read(), "window of 3 is full");
        s.complete(c, Outcome::Stored).unwrap();
        s.complete(b, Outcome::Stored).unwrap();
        assert!(written(&mut s).is_empty(), "nothing before the first message is stored");
        s.complete(a, Outcome::Dropped).unwrap();
        assert_eq!(written(&mut s), [Packet::PubAck(10), Packet::PubRec(11), Packet::PubAck(12)]);
        assert_eq!(s.pending(), 0);
        // The QoS 2 id awaits PUBREL and still takes a window slot.
        assert!(s.can_read());
        s.on_packet(Packet::PubRel(11), 1).unwrap();
        assert_eq!(written(&mut s), [Packet::PubComp(11)]);
    }

    #[test]
    fn qos0_is_not_tracked() {
        let mut s = connected();
        let event = s.on_packet(publish(QoS::AtMostOnce, 0), 1).unwrap();
        assert!(matches!(event, Event::Publish { ack: None, qos: QoS::AtMostOnce, .. }));
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn qos2_resend_is_stored_once() {
        let mut s = connected();
        let id = ack_id(s.on_packet(publish(QoS::ExactlyOnce, 7), 1).unwrap());
        // Resent before the commit: ignored, PUBREC follows the commit.
        assert_eq!(s.on_packet(publish(QoS::ExactlyOnce, 7), 1).unwrap(), Event::None);
        s.complete(id, Outcome::Stored).unwrap();
        assert_eq!(written(&mut s), [Packet::PubRec(7)]);
        // Resent after PUBREC: answered again, not stored.
        assert_eq!(s.on_packet(publish(QoS::ExactlyOnce, 7), 1).unwrap(), Event::None);
        assert_eq!(written(&mut s), [Packet::PubRec(7)]);
        s.on_packet(Packet::PubRel(7), 1).unwrap();
        assert_eq!(written(&mut s), [Packet::PubComp(7)]);
        // After PUBCOMP the id is free: a new message with it is stored.
        assert!(matches!(s.on_packet(publish(QoS::ExactlyOnce, 7), 1).unwrap(), Event::Publish { .. }));
    }

    #[test]
    fn failed_store_closes_without_ack() {
        let mut s = connected();
        let a = ack_id(s.on_packet(publish(QoS::AtLeastOnce, 1), 1).unwrap());
        let b = ack_id(s.on_packet(publish(QoS::AtLeastOnce, 2), 1).unwrap());
        s.complete(b, Outcome::Stored).unwrap();
        assert_eq!(s.complete(a, Outcome::Failed), Err(Violation::StoreFailed(1)));
        assert!(written(&mut s).is_empty());
    }

    #[test]
    fn subscribe_is_refused_and_connection_stays_usable() {
        let mut s = connected();
        let sub = Subscribe {
            pkid: 5,
            filters: vec![("a/#".into(), QoS::AtLeastOnce), ("b".into(), QoS::AtMostOnce)],
        };
        assert_eq!(s.on_packet(Packet::Subscribe(sub), 1).unwrap(), Event::None);
        assert_eq!(written(&mut s), [Packet::SubAck(SubAck { pkid: 5, return_codes: vec![0x80, 0x80] })]);
        s.on_packet(Packet::PingReq, 1).unwrap();
        assert_eq!(written(&mut s), [Packet::PingResp]);
    }

    #[test]
    fn connect_deadline_then_keepalive_at_one_and_a_half_times() {
        let t0 = Instant::now();
        let limits = SessionLimits { connect_timeout: Duration::from_secs(2), ..SessionLimits::default() };
        let mut s = Session::new(limits, t0);
        assert_eq!(s.deadline(), Some(t0 + Duration::from_secs(2)));
        assert_eq!(s.timed_out(), Violation::ConnectTimeout);
        // Activity before CONNECT does not extend the connect deadline.
        s.note_activity(t0 + Duration::from_secs(1));
        assert_eq!(s.deadline(), Some(t0 + Duration::from_secs(2)));
        // The CONNECT (keepalive 30 s) arrived in the bytes read at t0 + 1 s, and was accepted
        // at once.
        s.on_packet(connect("dev", true), 1).unwrap();
        accept(&mut s, t0 + Duration::from_secs(1));
        assert_eq!(s.deadline(), Some(t0 + Duration::from_secs(1) + Duration::from_secs(45)));
        assert_eq!(s.timed_out(), Violation::KeepaliveTimeout);
        s.note_activity(t0 + Duration::from_secs(40));
        assert_eq!(s.deadline(), Some(t0 + Duration::from_secs(85)));
    }

    /// Only where `max_keepalive_secs` is 0 (by default a keepalive of 0 gets the maximum).
    #[test]
    fn keepalive_zero_never_times_out() {
        let t0 = Instant::now();
        let mut s = Session::new(SessionLimits { max_keepalive_secs: 0, ..SessionLimits::default() }, t0);
        let Packet::Connect(mut c) = connect("dev", true) else { unreachable!() };
        c.keep_alive_secs = 0;
        s.on_packet(Packet::Connect(c), 1).unwrap();
        accept(&mut s, t0);
        assert_eq!(s.deadline(), None);
        s.note_activity(t0 + Duration::from_secs(5));
        assert_eq!(s.deadline(), None);
    }

    #[test]
    fn stale_and_unknown_completions_are_ignored() {
        let mut s = connected();
        s.complete(InflightId(99), Outcome::Stored).unwrap();
        let a = ack_id(s.on_packet(publish(QoS::AtLeastOnce, 1), 1).unwrap());
        s.complete(a, Outcome::Stored).unwrap();
        s.complete(a, Outcome::Stored).unwrap();
        assert_eq!(written(&mut s), [Packet::PubAck(1)]);
    }

    // ---- MQTT 5 ----

    fn limits_v5() -> SessionLimits {
        SessionLimits {
            max_inflight: 2,
            max_client_id_len: 16,
            max_topic_aliases: 4,
            max_keepalive_secs: 600,
            max_packet_size: 4096,
            ..SessionLimits::default()
        }
    }

    fn connect_v5(client_id: &str, keep_alive_secs: u16, properties: Properties) -> Packet {
        Packet::ConnectV5(Box::new(ConnectV5 {
            connect: Connect {
                protocol_level: 5,
                clean_session: true,
                keep_alive_secs,
                client_id: client_id.into(),
                will: None,
                username: None,
                password: None,
            },
            properties,
            will_properties: Properties::default(),
        }))
    }

    /// Connected with these CONNECT properties; the CONNACK (if it fit) is taken.
    fn connected_v5_with(properties: Properties) -> Session {
        let mut s = Session::new(limits_v5(), Instant::now());
        s.on_packet(connect_v5("dev5", 30, properties), 1).unwrap();
        accept(&mut s, Instant::now());
        written(&mut s);
        s
    }

    fn connected_v5() -> Session {
        let mut s = Session::new(limits_v5(), Instant::now());
        s.on_packet(connect_v5("dev5", 30, Properties::default()), 1).unwrap();
        accept(&mut s, Instant::now());
        assert!(matches!(written(&mut s)[..], [Packet::ConnAckV5(_)]));
        s
    }

    fn publish_v5(qos: QoS, pkid: u16, topic: &str, properties: Properties) -> Packet {
        Packet::PublishV5(PublishV5 {
            publish: Publish {
                dup: false,
                qos,
                retain: false,
                topic: topic.into(),
                pkid,
                payload: Bytes::from_static(b"{}"),
            },
            properties,
        })
    }

    fn alias(alias: u16) -> Properties {
        Properties { topic_alias: Some(alias), ..Properties::default() }
    }

    fn ack(pkid: u16, reason: ReasonCode, text: &str) -> AckV5 {
        let properties = if text.is_empty() { Properties::default() } else { reason_string(text) };
        AckV5 { pkid, reason, properties }
    }

    /// The one DISCONNECT the session queued, as (reason code, reason string).
    fn disconnect_sent(s: &mut Session) -> (ReasonCode, String) {
        match &written(s)[..] {
            [Packet::DisconnectV5(d)] => (d.reason, d.properties.reason_string.clone().unwrap_or_default()),
            other => panic!("expected one DISCONNECT, got {other:?}"),
        }
    }

    #[test]
    fn v5_connack_advertises_the_server_limits() {
        let mut s = Session::new(limits_v5(), Instant::now());
        let properties = Properties { session_expiry_interval: Some(3600), ..Properties::default() };
        let event = s.on_packet(connect_v5("", 0, properties), 9).unwrap();
        assert_eq!(
            request(event),
            ConnectRequest {
                client_id: "weir-auto-9".into(),
                assigned: true,
                version: ProtocolVersion::V5,
                clean_start: true,
                session_expiry_secs: Some(3600),
                keep_alive_secs: 600,
                username: None,
                password: None,
            }
        );
        // Granted 0 where 3600 was asked: the CONNACK says so.
        accept(&mut s, Instant::now());
        let expected = ConnAckV5 {
            session_present: false,
            reason: ReasonCode::Success,
            properties: Properties {
                receive_maximum: Some(2),
                maximum_packet_size: Some(4096),
                topic_alias_maximum: Some(4),
                assigned_client_identifier: Some("weir-auto-9".into()),
                server_keep_alive: Some(600),
                session_expiry_interval: Some(0),
                ..Properties::default()
            },
        };
        assert_eq!(written(&mut s), [Packet::ConnAckV5(expected)]);
        assert_eq!(s.decoder().version, ProtocolVersion::V5);
    }

    #[test]
    fn v5_session_present_and_the_granted_expiry() {
        let persistent = |expiry: Option<u32>| {
            let mut s = Session::new(limits_v5(), Instant::now());
            let Packet::ConnectV5(mut c) = connect_v5(
                "dev",
                30,
                Properties { session_expiry_interval: expiry, ..Properties::default() },
            ) else {
                unreachable!()
            };
            c.connect.clean_session = false;
            let request = request(s.on_packet(Packet::ConnectV5(c), 1).unwrap());
            assert_eq!(
                (request.clean_start, request.session_expiry_secs),
                (false, Some(expiry.unwrap_or(0)))
            );
            s
        };
        // Granted what was asked: no Session Expiry Interval in the CONNACK.
        let mut s = persistent(Some(3600));
        s.decide(
            ConnectDecision::Accept { session_present: true, session_expiry_secs: 3600 },
            Instant::now(),
        )
        .unwrap();
        let [Packet::ConnAckV5(connack)] = &written(&mut s)[..] else { panic!("CONNACK") };
        assert!(connack.session_present);
        assert_eq!(connack.properties.session_expiry_interval, None);
        // Capped: the CONNACK tells the device what it got.
        let mut s = persistent(Some(u32::MAX));
        s.decide(
            ConnectDecision::Accept { session_present: false, session_expiry_secs: 600 },
            Instant::now(),
        )
        .unwrap();
        let [Packet::ConnAckV5(connack)] = &written(&mut s)[..] else { panic!("CONNACK") };
        assert!(!connack.session_present);
        assert_eq!(connack.properties.session_expiry_interval, Some(600));
        // A DISCONNECT may change the expiry; the gateway is told.
        let bye = DisconnectV5 {
            reason: ReasonCode::Success,
            properties: Properties { session_expiry_interval: Some(5), ..Properties::default() },
        };
        assert_eq!(
            s.on_packet(Packet::DisconnectV5(bye), 1),
            Ok(Event::Disconnect { session_expiry_secs: Some(5) })
        );
    }

    #[test]
    fn v5_a_resumed_session_completes_pubrel_for_ids_it_never_saw() {
        let mut s = Session::new(limits_v5(), Instant::now());
        let Packet::ConnectV5(mut c) = connect_v5("dev", 30, Properties::default()) else { unreachable!() };
        c.connect.clean_session = false;
        s.on_packet(Packet::ConnectV5(c), 1).unwrap();
        s.decide(ConnectDecision::Accept { session_present: true, session_expiry_secs: 0 }, Instant::now())
            .unwrap();
        written(&mut s);
        // Its PUBREC was sent by the previous connection after the commit: stored, complete it.
        s.on_packet(Packet::PubRelV5(AckV5::success(9)), 1).unwrap();
        assert_eq!(written(&mut s), [Packet::PubCompV5(AckV5::success(9))]);
    }

    #[test]
    fn v5_server_keep_alive_caps_the_keepalive() {
        let t0 = Instant::now();
        for (asked, given, sent) in
            [(0, 600, Some(600)), (601, 600, Some(600)), (30, 30, None), (600, 600, None)]
        {
            let mut s = Session::new(limits_v5(), t0);
            let event = s.on_packet(connect_v5("d", asked, Properties::default()), 1).unwrap();
            assert_eq!(request(event).keep_alive_secs, given);
            accept(&mut s, t0);
            let [Packet::ConnAckV5(connack)] = &written(&mut s)[..] else { panic!("CONNACK") };
            assert_eq!(connack.properties.server_keep_alive, sent, "asked {asked}");
            assert_eq!(connack.properties.session_expiry_interval, None, "not asked, not sent");
            assert_eq!(s.deadline(), Some(t0 + Duration::from_millis(u64::from(given) * 1500)));
        }
    }

    #[test]
    fn v5_authentication_method_is_refused_with_0x8c() {
        let mut s = Session::new(limits_v5(), Instant::now());
        let properties =
            Properties { authentication_method: Some("SCRAM-SHA-1".into()), ..Properties::default() };
        let violation = s.on_packet(connect_v5("d", 30, properties), 1).unwrap_err();
        assert_eq!(violation, Violation::BadAuthenticationMethod("SCRAM-SHA-1".into()));
        let [Packet::ConnAckV5(connack)] = &written(&mut s)[..] else { panic!("CONNACK") };
        assert_eq!(connack.reason, ReasonCode::BadAuthenticationMethod);
        assert!(connack.properties.reason_string.as_deref().unwrap().contains("SCRAM-SHA-1"));
        assert!(!s.is_connected());
    }

    #[test]
    fn shutting_down_refuses_connect_as_server_busy() {
        let t0 = Instant::now();
        let mut s = Session::new(limits_v5(), t0);
        s.begin_shutdown(t0, Duration::from_secs(1));
        assert_eq!(s.deadline(), Some(t0 + Duration::from_secs(1)), "the connect deadline is cut");
        assert_eq!(s.on_packet(connect_v5("d", 30, Properties::default()), 1), Err(Violation::ServerBusy));
        let [Packet::ConnAckV5(busy)] = &written(&mut s)[..] else { panic!("CONNACK") };
        assert_eq!(busy.reason, ReasonCode::ServerBusy);

        let mut s = Session::new(limits_v5(), t0);
        s.begin_shutdown(t0, Duration::from_secs(1));
        assert_eq!(s.on_packet(connect("d", true), 1), Err(Violation::ServerBusy));
        assert_eq!(written(&mut s), [connack(ConnectReturnCode::ServerUnavailable)]);
    }

    #[test]
    fn v5_bad_client_id_gets_0x85() {
        let mut s = Session::new(limits_v5(), Instant::now());
        let violation = s.on_packet(connect_v5("a/b", 30, Properties::default()), 1).unwrap_err();
        assert!(matches!(violation, Violation::ClientIdRejected(_)));
        let [Packet::ConnAckV5(connack)] = &written(&mut s)[..] else { panic!("CONNACK") };
        assert_eq!(connack.reason, ReasonCode::ClientIdentifierNotValid);
    }

    #[test]
    fn v5_receive_maximum_is_enforced_and_reading_goes_on() {
        let mut s = connected_v5();
        let a = ack_id(s.on_packet(publish_v5(QoS::AtLeastOnce, 1, "t", Properties::default()), 1).unwrap());
        let b = ack_id(s.on_packet(publish_v5(QoS::ExactlyOnce, 2, "t", Properties::default()), 1).unwrap());
        assert!(s.can_read(), "MQTT 5 is read at its Receive Maximum, so PINGREQ is answered");
        s.on_packet(Packet::PingReq, 1).unwrap();
        assert_eq!(written(&mut s), [Packet::PingResp]);
        // QoS 0 does not count against Receive Maximum.
        assert!(s.on_packet(publish_v5(QoS::AtMostOnce, 0, "t", Properties::default()), 1).is_ok());
        s.complete(a, Outcome::Stored).unwrap();
        s.complete(b, Outcome::Stored).unwrap();
        assert_eq!(
            written(&mut s),
            [Packet::PubAckV5(AckV5::success(1)), Packet::PubRecV5(AckV5::success(2))]
        );
        // The QoS 2 message counts until PUBCOMP: one slot is left.
        let _c = ack_id(s.on_packet(publish_v5(QoS::AtLeastOnce, 3, "t", Properties::default()), 1).unwrap());
        let violation =
            s.on_packet(publish_v5(QoS::AtLeastOnce, 4, "t", Properties::default()), 1).unwrap_err();
        assert_eq!(violation, Violation::ReceiveMaximumExceeded(2));
        assert_eq!(disconnect_sent(&mut s).0, ReasonCode::ReceiveMaximumExceeded);
    }

    #[test]
    fn v5_pubrel_completes_and_unknown_ids_get_0x92() {
        let mut s = connected_v5();
        let a = ack_id(s.on_packet(publish_v5(QoS::ExactlyOnce, 7, "t", Properties::default()), 1).unwrap());
        s.complete(a, Outcome::Stored).unwrap();
        written(&mut s);
        s.on_packet(Packet::PubRelV5(AckV5::success(7)), 1).unwrap();
        s.on_packet(Packet::PubRelV5(AckV5::success(8)), 1).unwrap();
        assert_eq!(
            written(&mut s),
            [
                Packet::PubCompV5(AckV5::success(7)),
                Packet::PubCompV5(ack(8, ReasonCode::PacketIdentifierNotFound, ""))
            ]
        );
    }

    #[test]
    fn v5_topic_aliases() {
        let mut s = connected_v5();
        let event = s.on_packet(publish_v5(QoS::AtMostOnce, 0, "a/b", alias(1)), 1).unwrap();
        assert!(matches!(event, Event::Publish { ref topic, .. } if topic == "a/b"));
        let event = s.on_packet(publish_v5(QoS::AtMostOnce, 0, "", alias(1)), 1).unwrap();
        assert!(matches!(event, Event::Publish { ref topic, .. } if topic == "a/b"), "alias resolved");
        // Redefined.
        s.on_packet(publish_v5(QoS::AtMostOnce, 0, "c", alias(1)), 1).unwrap();
        let event = s.on_packet(publish_v5(QoS::AtMostOnce, 0, "", alias(1)), 1).unwrap();
        assert!(matches!(event, Event::Publish { ref topic, .. } if topic == "c"));

        for bad in [0, 5] {
            let mut s = connected_v5();
            let violation = s.on_packet(publish_v5(QoS::AtMostOnce, 0, "t", alias(bad)), 1).unwrap_err();
            assert_eq!(violation, Violation::TopicAliasInvalid { alias: bad, max: 4 });
            assert_eq!(disconnect_sent(&mut s).0, ReasonCode::TopicAliasInvalid, "alias {bad}");
        }

        let mut s = connected_v5();
        let violation = s.on_packet(publish_v5(QoS::AtMostOnce, 0, "", alias(2)), 1).unwrap_err();
        assert_eq!(violation, Violation::UnknownTopicAlias(2));
        assert_eq!(disconnect_sent(&mut s).0, ReasonCode::ProtocolError);
    }

    #[test]
    fn v5_alias_table_is_bounded_in_bytes() {
        // Topics as long as the table's bound (by default they are limited far below it).
        let limits = SessionLimits { max_topic_bytes: usize::MAX, ..limits_v5() };
        let mut s = Session::new(limits, Instant::now());
        s.on_packet(connect_v5("d", 30, Properties::default()), 1).unwrap();
        accept(&mut s, Instant::now());
        written(&mut s);
        let long = "x".repeat(MAX_ALIAS_TABLE_BYTES / 2);
        s.on_packet(publish_v5(QoS::AtMostOnce, 0, &long, alias(1)), 1).unwrap();
        s.on_packet(publish_v5(QoS::AtMostOnce, 0, &long, alias(2)), 1).unwrap();
        // Replacing an alias frees its bytes first.
        s.on_packet(publish_v5(QoS::AtMostOnce, 0, &format!("{long}y")[1..], alias(2)), 1).unwrap();
        let violation = s.on_packet(publish_v5(QoS::AtMostOnce, 0, "z", alias(3)), 1).unwrap_err();
        assert_eq!(violation, Violation::AliasTableFull);
        assert_eq!(disconnect_sent(&mut s).0, ReasonCode::QuotaExceeded);
    }

    #[test]
    fn v5_undecodable_payload_is_answered_0x99_after_its_dead_letter_is_stored() {
        let mut s = connected_v5();
        let a = ack_id(s.on_packet(publish_v5(QoS::AtLeastOnce, 1, "t", Properties::default()), 1).unwrap());
        let b = ack_id(s.on_packet(publish_v5(QoS::ExactlyOnce, 2, "t", Properties::default()), 1).unwrap());
        s.note_undecodable(a, "invalid JSON".into());
        s.note_undecodable(b, "invalid JSON".into());
        assert!(written(&mut s).is_empty(), "nothing before the dead letter is stored");
        s.complete(a, Outcome::Stored).unwrap();
        s.complete(b, Outcome::Stored).unwrap();
        let text = "stored as a dead letter: invalid JSON";
        assert_eq!(
            written(&mut s),
            [
                Packet::PubAckV5(ack(1, ReasonCode::PayloadFormatInvalid, text)),
                Packet::PubRecV5(ack(2, ReasonCode::PayloadFormatInvalid, text))
            ]
        );
        // An error PUBREC ends the QoS 2 exchange: the id is free and takes no window slot.
        assert_eq!(s.window_used(), 0);
    }

    #[test]
    fn v3_undecodable_payload_is_acked_plainly() {
        let mut s = connected();
        let a = ack_id(s.on_packet(publish(QoS::AtLeastOnce, 1), 1).unwrap());
        s.note_undecodable(a, "invalid JSON".into());
        s.complete(a, Outcome::Stored).unwrap();
        assert_eq!(written(&mut s), [Packet::PubAck(1)]);
    }

    #[test]
    fn v5_dropped_is_0x97_and_not_authorized_is_0x87() {
        let mut s = connected_v5();
        let a = ack_id(s.on_packet(publish_v5(QoS::AtLeastOnce, 1, "t", Properties::default()), 1).unwrap());
        let b = ack_id(s.on_packet(publish_v5(QoS::AtLeastOnce, 2, "t", Properties::default()), 1).unwrap());
        s.refuse(b, Refusal::NotAuthorized).unwrap();
        assert!(written(&mut s).is_empty(), "acks leave in order");
        s.complete(a, Outcome::Dropped).unwrap();
        let packets = written(&mut s);
        let codes: Vec<_> = packets
            .iter()
            .map(|p| match p {
                Packet::PubAckV5(ack) => (ack.pkid, ack.reason),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(codes, [(1, ReasonCode::QuotaExceeded), (2, ReasonCode::NotAuthorized)]);
    }

    #[test]
    fn v3_refusal_closes_the_connection() {
        let mut s = connected();
        let a = ack_id(s.on_packet(publish(QoS::AtLeastOnce, 1), 1).unwrap());
        assert_eq!(s.refuse(a, Refusal::NotAuthorized), Err(Violation::NotAuthorized));
        assert!(written(&mut s).is_empty());
    }

    /// Found by the session fuzz target's model (which expected only `StoreFailed` from
    /// `complete`): a refusal behind an unfinished message closes the 3.1.1 connection when its
    /// turn comes, so from the completion of the message before it, after that one's ack.
    #[test]
    fn v3_refusal_closes_when_its_turn_comes() {
        let mut s = connected();
        let a = ack_id(s.on_packet(publish(QoS::AtLeastOnce, 1), 1).unwrap());
        let b = ack_id(s.on_packet(publish(QoS::AtLeastOnce, 2), 1).unwrap());
        assert_eq!(s.refuse(b, Refusal::NotAuthorized), Ok(()));
        assert!(written(&mut s).is_empty());
        assert_eq!(s.complete(a, Outcome::Stored), Err(Violation::NotAuthorized));
        assert_eq!(written(&mut s), [Packet::PubAck(1)]);
    }

    /// The MQTT 5 counterpart: the refusal is an ack (0x87), and a failed message behind it
    /// still closes the connection, from the refusal's release.
    #[test]
    fn v5_failed_message_behind_a_refusal_closes_from_the_refusal() {
        let mut s = connected_v5();
        let a = ack_id(s.on_packet(publish_v5(QoS::AtLeastOnce, 1, "t", Properties::default()), 1).unwrap());
        let b = ack_id(s.on_packet(publish_v5(QoS::AtLeastOnce, 2, "t", Properties::default()), 1).unwrap());
        s.complete(b, Outcome::Failed).unwrap();
        assert_eq!(s.refuse(a, Refusal::NotAuthorized), Err(Violation::StoreFailed(1)));
        let sent = written(&mut s);
        assert!(
            matches!(&sent[..], [Packet::PubAckV5(ack), Packet::DisconnectV5(d)]
                if ack.reason == ReasonCode::NotAuthorized && d.reason == ReasonCode::UnspecifiedError),
            "{sent:?}"
        );
    }

    #[test]
    fn expired_credentials_and_unacked_refusals_disconnect_with_their_codes() {
        let mut s = connected_v5();
        assert_eq!(s.credentials_expired(), Violation::CredentialsExpired);
        let packets = written(&mut s);
        assert!(
            matches!(&packets[..], [Packet::DisconnectV5(d)] if d.reason == ReasonCode::MaximumConnectTime),
            "{packets:?}"
        );
        let mut s = connected_v5();
        assert_eq!(s.not_authorized(), Violation::NotAuthorized);
        let packets = written(&mut s);
        assert!(
            matches!(&packets[..], [Packet::DisconnectV5(d)] if d.reason == ReasonCode::NotAuthorized),
            "{packets:?}"
        );
        let mut s = connected();
        assert_eq!(s.credentials_expired(), Violation::CredentialsExpired);
        assert_eq!(s.not_authorized(), Violation::NotAuthorized);
        assert!(written(&mut s).is_empty(), "3.1.1 has no server DISCONNECT");
    }

    #[test]
    fn v5_failed_store_disconnects_without_ack() {
        let mut s = connected_v5();
        let a = ack_id(s.on_packet(publish_v5(QoS::AtLeastOnce, 1, "t", Properties::default()), 1).unwrap());
        assert_eq!(s.complete(a, Outcome::Failed), Err(Violation::StoreFailed(1)));
        assert_eq!(disconnect_sent(&mut s).0, ReasonCode::UnspecifiedError);
    }

    #[test]
    fn v5_decode_errors_and_timeouts_are_announced() {
        let cases = [
            (DecodeError::PacketTooLarge { size: 5000, max: 4096 }, ReasonCode::PacketTooLarge),
            (DecodeError::Truncated, ReasonCode::MalformedPacket),
            (DecodeError::DuplicateProperty(0x23), ReasonCode::ProtocolError),
            (DecodeError::TooManyUserProperties { max: 32 }, ReasonCode::QuotaExceeded),
        ];
        for (error, reason) in cases {
            let mut s = connected_v5();
            let text = error.to_string();
            assert_eq!(s.on_decode_error(error.clone()), Violation::Malformed(error));
            let (sent, string) = disconnect_sent(&mut s);
            assert_eq!(sent, reason);
            assert!(string.contains(&text), "{string}");
        }
        let mut s = connected_v5();
        assert_eq!(s.timed_out(), Violation::KeepaliveTimeout);
        assert_eq!(disconnect_sent(&mut s).0, ReasonCode::KeepAliveTimeout);
        // Before CONNECT nothing is announced.
        let mut s = Session::new(limits_v5(), Instant::now());
        assert_eq!(s.timed_out(), Violation::ConnectTimeout);
        assert!(written(&mut s).is_empty());
    }

    #[test]
    fn v5_protocol_errors_after_connect() {
        let cases: [(Packet, Violation); 4] = [
            (connect_v5("again", 30, Properties::default()), Violation::DuplicateConnect),
            (
                Packet::Auth(crate::mqtt::Auth {
                    reason: ReasonCode::ReAuthenticate,
                    properties: Properties::default(),
                }),
                Violation::ProtocolError("AUTH without an authentication method in CONNECT"),
            ),
            (
                Packet::DisconnectV5(DisconnectV5 {
                    reason: ReasonCode::Success,
                    properties: Properties { session_expiry_interval: Some(60), ..Properties::default() },
                }),
                Violation::ProtocolError("DISCONNECT set a session expiry after CONNECT set none"),
            ),
            (
                publish_v5(
                    QoS::AtMostOnce,
                    0,
                    "t",
                    Properties { subscription_identifiers: vec![1], ..Properties::default() },
                ),
                Violation::ProtocolError("a client PUBLISH carried a subscription identifier"),
            ),
        ];
        for (packet, violation) in cases {
            let mut s = connected_v5();
            assert_eq!(s.on_packet(packet, 1), Err(violation.clone()));
            assert_eq!(disconnect_sent(&mut s).0, ReasonCode::ProtocolError, "{violation}");
        }
        // A normal DISCONNECT just ends the connection.
        let mut s = connected_v5();
        let bye = DisconnectV5 { reason: ReasonCode::Success, properties: Properties::default() };
        assert_eq!(
            s.on_packet(Packet::DisconnectV5(bye), 1),
            Ok(Event::Disconnect { session_expiry_secs: None })
        );
    }

    #[test]
    fn v5_subscribe_and_unsubscribe_are_answered() {
        let mut s = connected_v5();
        let options = SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
        };
        let subscribe = SubscribeV5 {
            pkid: 3,
            properties: Properties::default(),
            filters: vec![("a/#".into(), options)],
        };
        s.on_packet(Packet::SubscribeV5(subscribe), 1).unwrap();
        let unsubscribe = UnsubscribeV5 {
            unsubscribe: Unsubscribe { pkid: 4, filters: vec!["a/#".into(), "b".into()] },
            properties: Properties::default(),
        };
        s.on_packet(Packet::UnsubscribeV5(unsubscribe), 1).unwrap();
        let packets = written(&mut s);
        let [Packet::SubAckV5(suback), Packet::UnsubAckV5(unsuback)] = &packets[..] else {
            panic!("{packets:?}")
        };
        assert_eq!(
            (suback.pkid, &suback.reason_codes[..]),
            (3, &[ReasonCode::ImplementationSpecificError][..])
        );
        assert!(suback.properties.reason_string.is_some());
        assert_eq!(unsuback.reason_codes, [ReasonCode::NoSubscriptionExisted; 2]);
    }

    #[test]
    fn v5_diagnostics_respect_the_client_maximum_packet_size_and_problem_information() {
        // 12 bytes fit a PUBACK with its reason code, not its reason string.
        let mut s = connected_v5_with(Properties { maximum_packet_size: Some(12), ..Properties::default() });
        assert_eq!(s.unsendable(), 1, "the CONNACK with its properties does not fit 12 bytes");
        let a = ack_id(s.on_packet(publish_v5(QoS::AtLeastOnce, 1, "t", Properties::default()), 1).unwrap());
        s.complete(a, Outcome::Dropped).unwrap();
        assert_eq!(written(&mut s), [Packet::PubAckV5(ack(1, ReasonCode::QuotaExceeded, ""))]);
        assert_eq!(s.unsendable(), 1);

        let no_problems = Properties { request_problem_information: Some(0), ..Properties::default() };
        let mut s = connected_v5_with(no_problems);
        let a = ack_id(s.on_packet(publish_v5(QoS::AtLeastOnce, 1, "t", Properties::default()), 1).unwrap());
        s.complete(a, Outcome::Dropped).unwrap();
        assert_eq!(written(&mut s), [Packet::PubAckV5(ack(1, ReasonCode::QuotaExceeded, ""))]);
        // DISCONNECT keeps its reason string.
        s.timed_out();
        assert!(!disconnect_sent(&mut s).1.is_empty());

        // A packet that cannot fit at all is not sent.
        let mut s = connected_v5_with(Properties { maximum_packet_size: Some(3), ..Properties::default() });
        s.on_packet(Packet::PingReq, 1).unwrap();
        assert_eq!(written(&mut s), [Packet::PingResp], "2 bytes fit");
        let a = ack_id(s.on_packet(publish_v5(QoS::AtLeastOnce, 1, "t", Properties::default()), 1).unwrap());
        s.complete(a, Outcome::Stored).unwrap();
        assert!(written(&mut s).is_empty());
        assert_eq!(s.unsendable(), 2, "the CONNACK and the PUBACK");
    }

    #[test]
    fn v5_shutdown_says_goodbye_with_0x8b() {
        let mut s = connected_v5();
        s.begin_shutdown(Instant::now(), Duration::from_secs(1));
        s.say_goodbye();
        assert_eq!(disconnect_sent(&mut s).0, ReasonCode::ServerShuttingDown);
        let mut s = connected();
        s.say_goodbye();
        assert!(written(&mut s).is_empty(), "3.1.1 has no server DISCONNECT");
    }

    #[test]
    fn payload_format_from_properties() {
        let with = |content_type: Option<&str>, indicator: Option<u8>| Properties {
            content_type: content_type.map(Into::into),
            payload_format_indicator: indicator,
            ..Properties::default()
        };
        let cases = [
            (with(Some("application/json"), None), Some(PayloadFormat::Json)),
            (with(Some("Application/JSON; charset=utf-8"), None), Some(PayloadFormat::Json)),
            (with(Some("application/x-protobuf"), Some(1)), Some(PayloadFormat::Protobuf)),
            (with(Some("application/protobuf"), None), Some(PayloadFormat::Protobuf)),
            (with(Some("application/vnd.google.protobuf"), None), Some(PayloadFormat::Protobuf)),
            (with(Some("text/plain"), Some(1)), Some(PayloadFormat::Json)),
            (with(Some("text/plain"), None), None),
            (with(None, Some(0)), None),
            (with(None, None), None),
        ];
        for (properties, expected) in cases {
            assert_eq!(payload_format(&properties), expected, "{properties:?}");
        }
        let mut s = connected_v5();
        let event = s.on_packet(publish_v5(QoS::AtMostOnce, 0, "t", with(Some("application/json"), None)), 1);
        assert!(matches!(event, Ok(Event::Publish { format: Some(PayloadFormat::Json), .. })));
    }

    #[test]
    fn mqtt_3_1_connects_as_3_1() {
        let mut s = Session::new(SessionLimits::default(), Instant::now());
        let Packet::Connect(mut c) = connect("a-31-client-id-longer-than-23", true) else { unreachable!() };
        c.protocol_level = 3;
        let event = s.on_packet(Packet::Connect(c), 1).unwrap();
        assert_eq!(request(event).version, ProtocolVersion::V31);
        accept(&mut s, Instant::now());
        assert_eq!(written(&mut s), [connack(ConnectReturnCode::Accepted)]);
        assert_eq!(s.decoder().version, ProtocolVersion::V31);
    }

    // ---- Classic broker CVE classes (the others are next to their decoders: remaining length
    // past the body in publish.rs/connect.rs/codec.rs, zero-length topics, invalid UTF-8, QoS
    // > 0 without packet id in publish.rs, topic alias beyond the maximum above) ----

    /// Decodes the packets in `bytes` with the session's own decoder and hands them in, as the
    /// connection task does; the first violation ends it.
    fn feed(s: &mut Session, packets: &[Packet]) -> Result<Vec<Event>, Violation> {
        let mut buf = BytesMut::new();
        for packet in packets {
            encode(packet, &mut buf);
        }
        let mut events = Vec::new();
        loop {
            match s.decoder().decode(&mut buf) {
                Ok(Some(packet)) => events.push(s.on_packet(packet, 1)?),
                Ok(None) => return Ok(events),
                Err(error) => return Err(s.on_decode_error(error)),
            }
        }
    }

    /// Thousands of User Properties in one packet (memory per packet): refused at the cap
    /// (`max_user_properties`) before they are allocated, and announced as quota exceeded.
    #[test]
    fn v5_thousands_of_user_properties_close_with_0x97() {
        let limits = SessionLimits { max_packet_size: 1 << 20, ..limits_v5() };
        let mut s = Session::new(limits, Instant::now());
        s.on_packet(connect_v5("dev5", 30, Properties::default()), 1).unwrap();
        accept(&mut s, Instant::now());
        written(&mut s);
        let properties =
            Properties { user_properties: vec![("k".into(), "v".into()); 5_000], ..Properties::default() };
        let violation = feed(&mut s, &[publish_v5(QoS::AtMostOnce, 0, "t", properties)]).unwrap_err();
        assert_eq!(violation, Violation::Malformed(DecodeError::TooManyUserProperties { max: 32 }));
        assert_eq!(disconnect_sent(&mut s).0, ReasonCode::QuotaExceeded);
    }

    /// A topic of 65,000 levels. By default (`max_topic_levels` 32) such a PUBLISH closes the
    /// connection. Where the limits allow it, it is ingested as any other: weir never splits a
    /// topic name into levels (it ingests, it does not route) and counts them in one pass. Such
    /// a SUBSCRIBE is refused (0x80) as any other; a misplaced wildcard at its end is found.
    #[test]
    fn topics_of_65_000_levels() {
        let levels = "/".repeat(64_999); // 65,000 empty levels
        let mut publish = Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: levels.clone(),
            pkid: 0,
            payload: Bytes::from_static(b"{}"),
        };
        let mut s = connected();
        let refused = feed(&mut s, &[Packet::Publish(publish.clone())]).unwrap_err();
        assert_eq!(
            refused,
            Violation::TopicTooLong { bytes: 64_999, levels: 65_000, max_bytes: 1024, max_levels: 32 }
        );

        let unlimited = SessionLimits {
            max_topic_bytes: usize::MAX,
            max_topic_levels: usize::MAX,
            ..SessionLimits::default()
        };
        let mut s = Session::new(unlimited, Instant::now());
        s.on_packet(connect("dev", true), 1).unwrap();
        accept(&mut s, Instant::now());
        written(&mut s);
        let events = feed(&mut s, &[Packet::Publish(publish.clone())]).unwrap();
        assert!(matches!(&events[..], [Event::Publish { topic, .. }] if *topic == levels));

        let filter = format!("{levels}#"); // '#' alone in level 65,000
        let subscribe = Subscribe { pkid: 1, filters: vec![(filter, QoS::AtLeastOnce)] };
        assert_eq!(feed(&mut s, &[Packet::Subscribe(subscribe)]).unwrap(), [Event::None]);
        assert_eq!(
            written(&mut s),
            [Packet::SubAck(SubAck { pkid: 1, return_codes: vec![SubAck::FAILURE] })]
        );

        let misplaced = Subscribe { pkid: 2, filters: vec![(format!("{levels}a#"), QoS::AtMostOnce)] };
        assert_eq!(
            feed(&mut s, &[Packet::Subscribe(misplaced)]),
            Err(Violation::Malformed(DecodeError::InvalidTopicFilter))
        );

        // A wildcard in a topic name of as many levels.
        let mut s = connected();
        publish.topic = format!("{levels}+");
        assert_eq!(
            feed(&mut s, &[Packet::Publish(publish)]),
            Err(Violation::Malformed(DecodeError::WildcardInTopic))
        );
    }

    /// Keepalive abuse (SlowITe, CVE-2020-13849: a keepalive of 65,535 s lets a silent device
    /// hold its connection 1.5 × that long). An MQTT 5 device is given Server Keep Alive =
    /// `max_keepalive_secs` instead. MQTT 3.1.1 cannot be told a lower keepalive, so weir keeps
    /// the spec's 1.5 × what was asked (computed exactly, without overflow); such connections
    /// are bounded by the listener's `max_connections`.
    #[test]
    fn keepalive_of_65535_seconds() {
        let t0 = Instant::now();
        let mut s = Session::new(limits_v5(), t0);
        let granted = request(s.on_packet(connect_v5("d", u16::MAX, Properties::default()), 1).unwrap());
        assert_eq!(granted.keep_alive_secs, 600);
        accept(&mut s, t0);
        let [Packet::ConnAckV5(connack)] = &written(&mut s)[..] else { panic!("CONNACK") };
        assert_eq!(connack.properties.server_keep_alive, Some(600));
        assert_eq!(s.deadline(), Some(t0 + Duration::from_secs(900)));
        assert_eq!(s.timed_out(), Violation::KeepaliveTimeout);
        assert_eq!(disconnect_sent(&mut s).0, ReasonCode::KeepAliveTimeout);

        let mut s = Session::new(SessionLimits::default(), t0);
        let Packet::Connect(mut c) = connect("dev", true) else { unreachable!() };
        c.keep_alive_secs = u16::MAX;
        s.on_packet(Packet::Connect(c), 1).unwrap();
        accept(&mut s, t0);
        // 3.1.1 cannot be told: the device is held to 600 s all the same.
        assert_eq!(s.deadline(), Some(t0 + Duration::from_secs(900)));
        assert_eq!(s.timed_out(), Violation::KeepaliveTimeout);

        // A keepalive of 0 (none) gets the maximum too; below it, what was asked.
        for (asked, held) in [(0, 600), (60, 60)] {
            let mut s = Session::new(SessionLimits::default(), t0);
            let Packet::Connect(mut c) = connect("dev", true) else { unreachable!() };
            c.keep_alive_secs = asked;
            assert_eq!(request(s.on_packet(Packet::Connect(c), 1).unwrap()).keep_alive_secs, held);
            accept(&mut s, t0);
            assert_eq!(s.deadline(), Some(t0 + Duration::from_millis(1500 * u64::from(held))));
        }

        // max_keepalive_secs = 0: devices keep what they asked for, 65,535 s included.
        let mut s = Session::new(SessionLimits { max_keepalive_secs: 0, ..SessionLimits::default() }, t0);
        let Packet::Connect(mut c) = connect("dev", true) else { unreachable!() };
        c.keep_alive_secs = u16::MAX;
        s.on_packet(Packet::Connect(c), 1).unwrap();
        accept(&mut s, t0);
        assert_eq!(s.deadline(), Some(t0 + Duration::from_millis(98_302_500)));
    }

    /// Topic names beyond `max_topic_bytes` or `max_topic_levels` close the connection: MQTT 5
    /// after DISCONNECT 0x90, and before a topic alias could keep them.
    #[test]
    fn topic_length_and_levels_are_limited() {
        let limits = SessionLimits { max_topic_bytes: 16, max_topic_levels: 3, ..SessionLimits::default() };
        for (topic, ok) in
            [("a/b/c", true), ("a/b/c/d", false), ("0123456789abcdef", true), ("0123456789abcdefg", false)]
        {
            let mut s = Session::new(limits, Instant::now());
            s.on_packet(connect_v5("d", 30, Properties::default()), 1).unwrap();
            accept(&mut s, Instant::now());
            written(&mut s);
            let properties = Properties { topic_alias: Some(1), ..Properties::default() };
            let result = feed(&mut s, &[publish_v5(QoS::AtLeastOnce, 1, topic, properties)]);
            assert_eq!(result.is_ok(), ok, "{topic}: {result:?}");
            if !ok {
                assert!(matches!(result, Err(Violation::TopicTooLong { .. })));
                assert_eq!(disconnect_sent(&mut s).0, ReasonCode::TopicNameInvalid);
                assert_eq!(s.alias_table_bytes, 0, "{topic} kept as an alias");
            }
        }
    }

    /// Duplicate QoS 2 packet ids on MQTT 5 (the 3.1.1 case is `qos2_resend_is_stored_once`):
    /// a resend is stored once, answered PUBREC again once stored, and the id is free after
    /// PUBCOMP.
    #[test]
    fn v5_duplicate_qos2_packet_ids_are_stored_once() {
        let mut s = connected_v5();
        let qos2 = || publish_v5(QoS::ExactlyOnce, 7, "t", Properties::default());
        let id = ack_id(s.on_packet(qos2(), 1).unwrap());
        assert_eq!(s.on_packet(qos2(), 1).unwrap(), Event::None, "resent before the commit");
        assert_eq!(s.pending(), 1);
        s.complete(id, Outcome::Stored).unwrap();
        assert_eq!(written(&mut s), [Packet::PubRecV5(AckV5::success(7))]);
        assert_eq!(s.on_packet(qos2(), 1).unwrap(), Event::None, "resent after PUBREC");
        assert_eq!(written(&mut s), [Packet::PubRecV5(AckV5::success(7))]);
        s.on_packet(Packet::PubRelV5(AckV5::success(7)), 1).unwrap();
        assert_eq!(written(&mut s), [Packet::PubCompV5(AckV5::success(7))]);
        assert!(matches!(s.on_packet(qos2(), 1).unwrap(), Event::Publish { .. }), "a new message");
    }
}
