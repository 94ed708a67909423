//! The server side of one MQTT connection as a plain state machine: packets in, events and
//! packets to write out. The connection task does the I/O and the clock; this decides.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::{encode, ConnAck, Connect, ConnectReturnCode, DecodeError, Packet, Publish, QoS, SubAck};

/// Per-connection bounds, fixed when the connection starts.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// QoS 1/2 messages received but not yet acknowledged (plus QoS 2 ids awaiting PUBREL).
    /// At the bound the connection stops reading: this is the backpressure an MQTT 3.1.1
    /// device sees, since the protocol has no Receive Maximum.
    pub max_inflight: usize,
    /// Longest accepted client id, in bytes.
    pub max_client_id_len: usize,
    /// Time from the connection's start to a complete CONNECT.
    pub connect_timeout: Duration,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self { max_inflight: 1024, max_client_id_len: 256, connect_timeout: Duration::from_secs(10) }
    }
}

/// What the sink finally did with every record of one QoS 1/2 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Committed (or dead-lettered, also a durable outcome): acknowledge.
    Stored,
    /// Dropped under the `drop_newest` policy, counted by the gateway. MQTT 3.1.1 has no error
    /// PUBACK, so it is acknowledged; resending would not help.
    Dropped,
    /// Not stored (sink failed for good, shutdown before commit): close without acknowledging,
    /// so the device resends after it reconnects.
    Failed,
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

/// What the gateway must act on after a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Nothing beyond the packets already queued for writing.
    None,
    /// CONNECT accepted and CONNACK queued.
    Connected { client_id: String, assigned: bool, clean_session: bool, keep_alive_secs: u16 },
    /// A message to decode and enqueue; `ack` is set for QoS 1/2 and must be completed with
    /// [`Session::complete`] once the outcome is known.
    Publish { topic: String, payload: Bytes, qos: QoS, ack: Option<InflightId> },
    /// The device said goodbye: stop reading and close.
    Disconnect,
}

/// Why the connection must close. The caller counts it; packets queued before it are still sent.
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
    #[error("a QoS {0} message could not be stored")]
    StoreFailed(u8),
    #[error("no CONNECT within the connect timeout")]
    ConnectTimeout,
    #[error("nothing received for 1.5 times the keepalive")]
    KeepaliveTimeout,
}

#[derive(Debug)]
struct Inflight {
    id: u64,
    pkid: u16,
    qos: QoS,
    outcome: Option<Outcome>,
}

/// The server side of one MQTT connection.
#[derive(Debug)]
pub struct Session {
    limits: SessionLimits,
    connected: bool,
    /// QoS 1/2 messages in the order received; acks leave in this order (MQTT 4.6).
    inflight: VecDeque<Inflight>,
    next_id: u64,
    /// QoS 2 packet ids whose PUBREC was sent and whose PUBREL has not arrived. A PUBLISH
    /// reusing one is a resend of a stored message: answered, not stored again.
    awaiting_rel: HashSet<u16>,
    out: BytesMut,
    /// 1.5 × the keepalive the device asked for; `None` when it asked for none (0).
    keepalive: Option<Duration>,
    /// When the device last sent bytes (or weir last resumed reading it).
    last_activity: Instant,
    /// When the connection times out unless the device sends something.
    deadline: Option<Instant>,
}

impl Session {
    /// A session for a connection opened at `now`; CONNECT is due by the connect timeout.
    pub fn new(limits: SessionLimits, now: Instant) -> Self {
        Self {
            limits,
            connected: false,
            inflight: VecDeque::new(),
            next_id: 0,
            awaiting_rel: HashSet::new(),
            out: BytesMut::new(),
            keepalive: None,
            last_activity: now,
            deadline: Some(now + limits.connect_timeout),
        }
    }

    /// Records that the device was heard from at `now`, or that weir resumes reading it after
    /// holding it back (time spent under backpressure is weir's doing, never the device's).
    pub fn note_activity(&mut self, now: Instant) {
        self.last_activity = now;
        if self.connected {
            self.deadline = self.keepalive.map(|k| now + k);
        }
    }

    /// When the connection must close if nothing arrives: the connect deadline before CONNECT,
    /// 1.5 × keepalive after the last activity once connected, or never (keepalive 0).
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The violation for a deadline that passed.
    pub fn timed_out(&self) -> Violation {
        if self.connected {
            Violation::KeepaliveTimeout
        } else {
            Violation::ConnectTimeout
        }
    }

    /// Whether the connection may read the next packet. False while the in-flight window is
    /// full: the socket is left unread so the device's writes block.
    pub fn can_read(&self) -> bool {
        self.inflight.len() + self.awaiting_rel.len() < self.limits.max_inflight
    }

    /// QoS 1/2 messages still waiting for their outcome.
    pub fn pending(&self) -> usize {
        self.inflight.len()
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Encoded packets waiting to be written; the caller writes and clears them.
    pub fn outgoing(&mut self) -> &mut BytesMut {
        &mut self.out
    }

    /// Handles a decode error: queues the answer the spec requires (CONNACK 0x01 for an
    /// unsupported protocol level on CONNECT) and says why the connection closes.
    pub fn on_decode_error(&mut self, error: DecodeError) -> Violation {
        match error {
            DecodeError::UnsupportedProtocolLevel(level) if !self.connected => {
                self.write_connack(ConnectReturnCode::UnacceptableProtocolVersion);
                Violation::UnsupportedProtocolLevel(level)
            }
            other => Violation::Malformed(other),
        }
    }

    /// Handles one decoded packet from the device.
    pub fn on_packet(&mut self, packet: Packet, connection_id: u64) -> Result<Event, Violation> {
        if !self.connected {
            return match packet {
                Packet::Connect(connect) => self.on_connect(connect, connection_id),
                _ => Err(Violation::NotConnected),
            };
        }
        match packet {
            Packet::Publish(publish) => Ok(self.on_publish(publish)),
            Packet::PubRel(pkid) => {
                self.awaiting_rel.remove(&pkid);
                self.write(&Packet::PubComp(pkid));
                Ok(Event::None)
            }
            Packet::Subscribe(subscribe) => {
                // weir ingests; it is not a broker. Refuse every filter, keep the connection.
                let return_codes = vec![0x80; subscribe.filters.len()];
                self.write(&Packet::SubAck(SubAck { pkid: subscribe.pkid, return_codes }));
                Ok(Event::None)
            }
            Packet::Unsubscribe(unsubscribe) => {
                self.write(&Packet::UnsubAck(unsubscribe.pkid));
                Ok(Event::None)
            }
            Packet::PingReq => {
                self.write(&Packet::PingResp);
                Ok(Event::None)
            }
            Packet::Disconnect => Ok(Event::Disconnect),
            // weir never publishes to devices, so there is nothing for these to acknowledge.
            Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) => Ok(Event::None),
            Packet::Connect(_) => Err(Violation::DuplicateConnect),
            Packet::ConnAck(_) => Err(Violation::UnexpectedPacket("CONNACK")),
            Packet::SubAck(_) => Err(Violation::UnexpectedPacket("SUBACK")),
            Packet::UnsubAck(_) => Err(Violation::UnexpectedPacket("UNSUBACK")),
            Packet::PingResp => Err(Violation::UnexpectedPacket("PINGRESP")),
        }
    }

    /// Records the outcome of an in-flight message and queues every acknowledgement that is now
    /// due, in receive order. A failed message closes the connection unacknowledged.
    pub fn complete(&mut self, id: InflightId, outcome: Outcome) -> Result<(), Violation> {
        let Some(front) = self.inflight.front() else { return Ok(()) };
        let Some(index) = id.0.checked_sub(front.id) else { return Ok(()) };
        let Some(entry) = self.inflight.get_mut(index as usize) else { return Ok(()) };
        entry.outcome = Some(outcome);
        while let Some(entry) = self.inflight.front() {
            let Some(outcome) = entry.outcome else { break };
            let (pkid, qos) = (entry.pkid, entry.qos);
            self.inflight.pop_front();
            if outcome == Outcome::Failed {
                return Err(Violation::StoreFailed(qos as u8));
            }
            if qos == QoS::ExactlyOnce {
                self.awaiting_rel.insert(pkid);
                self.write(&Packet::PubRec(pkid));
            } else {
                self.write(&Packet::PubAck(pkid));
            }
        }
        Ok(())
    }

    fn on_connect(&mut self, connect: Connect, connection_id: u64) -> Result<Event, Violation> {
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
        if client_id.len() > self.limits.max_client_id_len {
            return Err(self.reject_client_id("longer than the limit"));
        }
        if client_id.contains(['+', '#', '/']) || client_id.chars().any(char::is_control) {
            return Err(self.reject_client_id("contains a wildcard, '/' or a control character"));
        }
        self.connected = true;
        // MQTT 3.1.1 3.1.2.10: the server allows one and a half keepalive periods of silence.
        self.keepalive = (connect.keep_alive_secs > 0)
            .then(|| Duration::from_millis(u64::from(connect.keep_alive_secs) * 1500));
        self.deadline = self.keepalive.map(|k| self.last_activity + k);
        self.write_connack(ConnectReturnCode::Accepted);
        Ok(Event::Connected {
            client_id,
            assigned,
            clean_session: connect.clean_session,
            keep_alive_secs: connect.keep_alive_secs,
        })
    }

    fn on_publish(&mut self, publish: Publish) -> Event {
        let Publish { qos, pkid, topic, payload, .. } = publish;
        if qos == QoS::ExactlyOnce {
            if self.awaiting_rel.contains(&pkid) {
                // Already stored and PUBREC sent; the device missed it. Answer again, store once.
                self.write(&Packet::PubRec(pkid));
                return Event::None;
            }
            if self.inflight.iter().any(|e| e.pkid == pkid && e.qos == QoS::ExactlyOnce) {
                // A resend of a message still being stored; its PUBREC follows the commit.
                return Event::None;
            }
        }
        let ack = (qos != QoS::AtMostOnce).then(|| {
            let id = self.next_id;
            self.next_id += 1;
            self.inflight.push_back(Inflight { id, pkid, qos, outcome: None });
            InflightId(id)
        });
        Event::Publish { topic, payload, qos, ack }
    }

    fn reject_client_id(&mut self, reason: &'static str) -> Violation {
        self.write_connack(ConnectReturnCode::IdentifierRejected);
        Violation::ClientIdRejected(reason)
    }

    fn write_connack(&mut self, code: ConnectReturnCode) {
        self.write(&Packet::ConnAck(ConnAck { session_present: false, code }));
    }

    fn write(&mut self, packet: &Packet) {
        encode(packet, &mut self.out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::{decode, Subscribe};

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

    /// Decodes everything the session queued for writing.
    fn written(session: &mut Session) -> Vec<Packet> {
        let mut packets = Vec::new();
        let out = session.outgoing();
        while let Some(p) = decode(out, 1 << 20).unwrap() {
            packets.push(p);
        }
        assert!(out.is_empty());
        packets
    }

    fn connected() -> Session {
        let mut s = Session::new(
            SessionLimits { max_inflight: 3, max_client_id_len: 8, ..SessionLimits::default() },
            Instant::now(),
        );
        s.on_packet(connect("dev", true), 1).unwrap();
        written(&mut s);
        s
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
            event,
            Event::Connected {
                client_id: "weir-auto-42".into(),
                assigned: true,
                clean_session: true,
                keep_alive_secs: 30
            }
        );
        assert_eq!(written(&mut s), [connack(ConnectReturnCode::Accepted)]);
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
        // The CONNECT (keepalive 30 s) arrived in the bytes read at t0 + 1 s.
        s.on_packet(connect("dev", true), 1).unwrap();
        assert_eq!(s.deadline(), Some(t0 + Duration::from_secs(1) + Duration::from_secs(45)));
        assert_eq!(s.timed_out(), Violation::KeepaliveTimeout);
        s.note_activity(t0 + Duration::from_secs(40));
        assert_eq!(s.deadline(), Some(t0 + Duration::from_secs(85)));
    }

    #[test]
    fn keepalive_zero_never_times_out() {
        let t0 = Instant::now();
        let mut s = Session::new(SessionLimits::default(), t0);
        let Packet::Connect(mut c) = connect("dev", true) else { unreachable!() };
        c.keep_alive_secs = 0;
        s.on_packet(Packet::Connect(c), 1).unwrap();
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
}
