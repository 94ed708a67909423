//! The server session state machine driven the way the gateway's MQTT connection task drives
//! it, by bytes and events from the input, with a model of what it must write back.
//!
//! Input: four bytes of limits, then operations, each a tag byte (`tag % 10`) and its
//! arguments:
//!
//! ```text
//! b0   max_inflight = 1 + (b0 & 7), max_topic_aliases = b0 >> 3
//! b1   max_packet_size = 32 << (b1 & 7), max_user_properties = b1 >> 3
//! b2   max_client_id_len, max_topic_bytes = 8 + b2
//! b3   max_keepalive_secs = 5 × b3, max_topic_levels = 1 + (b3 & 7)
//! op 0 BYTES len(u8) bytes   bytes from the device (read now, or buffered while not reading)
//! op 1 ADVANCE ms(u16)       the clock moves on 10 × ms milliseconds; a passed deadline closes
//! op 2 DECIDE d(u8)          the session store's answer to a CONNECT (accept or a refusal)
//! op 3 COMPLETE i(u8) o(u8)  the sink's outcome for the i-th message handed out
//! op 4 REFUSE i(u8)          the message is refused (not authorized)
//! op 5 UNDECODABLE i(u8)     the message's payload was dead-lettered
//! op 6 SHUTDOWN              the gateway begins to shut down
//! op 7 TAKEN_OVER            another connection took the client id over
//! op 8 ACTIVITY              weir resumes reading after holding the device back
//! op 9 IDLE                  the connection goes idle: buffers are released
//! ```
//!
//! Checked after every step: the session's own invariants (window, ids, alias table, phase,
//! deadline), that everything it queued decodes as server-to-client packets of its version
//! within the device's Maximum Packet Size, at most one CONNACK, acknowledgements leave in
//! receive order, one per QoS 1/2 message and of the right kind, PUBREL is answered per the
//! model of ids awaiting it, a resent QoS 2 message is answered and not stored again, and what
//! the session reports (CONNECT, PUBLISH) respects the limits.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::BytesMut;

use super::Input;
use crate::mqtt::session::{
    ConnectDecision, ConnectRefusal, Event, InflightId, Outcome, Refusal, Session, SessionLimits, Violation,
};
use crate::mqtt::{encoded_len, ConnectReturnCode, Decoder, Packet, QoS, ReasonCode};

const CONNECTION_ID: u64 = 7;

pub fn mqtt_session(data: &[u8]) {
    let mut input = Input::new(data);
    let (b0, b1, b2, b3) = (input.u8(), input.u8(), input.u8(), input.u8());
    let limits = SessionLimits {
        max_inflight: 1 + usize::from(b0 & 7),
        max_client_id_len: usize::from(b2),
        connect_timeout: Duration::from_secs(5),
        max_packet_size: 32 << (b1 & 7),
        max_user_properties: usize::from(b1 >> 3),
        max_topic_aliases: u16::from(b0 >> 3),
        max_keepalive_secs: 5 * u16::from(b3),
        max_topic_bytes: 8 + usize::from(b2),
        max_topic_levels: 1 + usize::from(b3 & 7),
    };
    let mut harness = Harness::new(limits);
    while !input.is_empty() && !harness.ended {
        let tag = input.u8();
        match tag % 10 {
            0 => {
                let len = usize::from(input.u8());
                harness.bytes(input.bytes(len));
            }
            1 => harness.advance(Duration::from_millis(10 * u64::from(input.u16()))),
            2 => harness.decide(input.u8()),
            3 => {
                let (index, outcome) = (input.u8(), input.u8());
                harness.complete(index, outcome);
            }
            4 => harness.refuse(input.u8()),
            5 => harness.undecodable(input.u8()),
            6 => harness.shutdown(),
            7 => harness.taken_over(),
            8 => harness.session.note_activity(harness.now),
            _ => {
                if harness.read_buf.is_empty() {
                    harness.session.release_idle_memory();
                }
            }
        }
        if !harness.ended {
            harness.drive();
        }
    }
}

/// The session, the clock and the bytes read, plus what a correct session's device would see.
struct Harness {
    session: Session,
    limits: SessionLimits,
    now: Instant,
    read_buf: BytesMut,
    was_reading: bool,
    /// The connection is closed (a violation, a DISCONNECT, a timeout, the end of shutdown).
    ended: bool,
    /// Shutdown stopped reading an accepted connection; it ends once every ack is out.
    stopping: bool,
    /// The CONNECT asked for a clean start, and the decision said a session was present.
    clean_start: bool,
    resumed: bool,
    accepted: bool,
    connacks: usize,
    /// The MQTT 5 device's Maximum Packet Size.
    client_max_packet_size: usize,
    /// QoS 1/2 messages reported, in order, not yet acknowledged: (packet id, QoS).
    awaiting_ack: VecDeque<(u16, QoS)>,
    /// QoS 2 ids whose PUBREC (success) was sent and whose PUBREL has not come.
    rec_sent: HashSet<u16>,
    /// Every in-flight id handed out, for the completion operations to pick from.
    ids: Vec<InflightId>,
    /// The session dropped a packet too large for the device's Maximum Packet Size: from then
    /// on the device misses some answers, and the model of acks and answers is not checked.
    lossy: bool,
    unsendable_seen: u64,
}

/// What the packet just handed to the session must be answered with, besides acks that
/// completions release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Nothing,
    /// A PUBREL: exactly one PUBCOMP with this id.
    PubComp(u16),
    /// A resend of a QoS 2 message whose PUBREC was sent: that PUBREC again.
    PubRecAgain(u16),
}

impl Harness {
    fn new(limits: SessionLimits) -> Self {
        let now = Instant::now();
        Self {
            session: Session::new(limits, now),
            limits,
            now,
            read_buf: BytesMut::new(),
            was_reading: true,
            ended: false,
            stopping: false,
            clean_start: false,
            resumed: false,
            accepted: false,
            connacks: 0,
            client_max_packet_size: usize::MAX,
            awaiting_ack: VecDeque::new(),
            rec_sent: HashSet::new(),
            ids: Vec::new(),
            lossy: false,
            unsendable_seen: 0,
        }
    }

    fn reading(&self) -> bool {
        !self.ended && !self.stopping && self.session.can_read()
    }

    fn bytes(&mut self, bytes: &[u8]) {
        // Bytes arriving while the connection does not read stay in the socket; they are read
        // with the next read, which is the same as buffering them now.
        if self.reading() && !bytes.is_empty() {
            self.session.note_activity(self.now);
        }
        self.read_buf.extend_from_slice(bytes);
    }

    /// The connection task's read loop: packets while the session may read, then the
    /// bookkeeping of a turn.
    fn drive(&mut self) {
        while self.reading() {
            match self.session.decoder().decode(&mut self.read_buf) {
                Ok(None) => break,
                Ok(Some(packet)) => self.packet(packet),
                Err(error) => {
                    let violation = self.session.on_decode_error(error);
                    self.check_output(Expect::Nothing);
                    self.end(&violation);
                }
            }
        }
        if self.stopping && !self.ended && self.session.pending() == 0 {
            self.session.say_goodbye();
            let sent = self.check_output(Expect::Nothing);
            if self.session.version().is_v5() {
                assert!(
                    matches!(&sent[..], [Packet::DisconnectV5(d)] if d.reason == ReasonCode::ServerShuttingDown)
                        || (sent.is_empty() && self.session.unsendable() > 0),
                    "shutdown goodbye: {sent:?}"
                );
            }
            self.ended = true;
        }
        let reading = self.reading();
        if reading && !self.was_reading {
            self.session.note_activity(self.now);
        }
        self.was_reading = reading;
        self.session.assert_invariants();
    }

    fn packet(&mut self, packet: Packet) {
        let connected = self.session.is_connected();
        let mut expect = Expect::Nothing;
        let mut publish_qos = None;
        // Only the first CONNECT counts; a second one is a violation.
        let connecting = !connected && !self.session.is_deciding();
        match &packet {
            Packet::ConnectV5(connect) if connecting => {
                if let Some(max) = connect.properties.maximum_packet_size {
                    self.client_max_packet_size = max as usize;
                }
                self.clean_start = connect.connect.clean_session;
            }
            Packet::Connect(connect) if connecting => self.clean_start = connect.clean_session,
            Packet::PubRel(pkid) if connected => expect = Expect::PubComp(*pkid),
            Packet::PubRelV5(rel) if connected => expect = Expect::PubComp(rel.pkid),
            Packet::Publish(p) if connected => publish_qos = Some((p.qos, p.pkid)),
            Packet::PublishV5(p) if connected => publish_qos = Some((p.publish.qos, p.publish.pkid)),
            _ => {}
        }
        if let Some((QoS::ExactlyOnce, pkid)) = publish_qos {
            if self.rec_sent.contains(&pkid) {
                expect = Expect::PubRecAgain(pkid);
            }
        }
        let was_pingreq = connected && packet == Packet::PingReq;
        let result = self.session.on_packet(packet, CONNECTION_ID);
        // A packet that breaks a rule is answered with the violation alone (MQTT 5: DISCONNECT).
        if result.is_err() {
            expect = Expect::Nothing;
        }
        let sent = self.check_output(expect);
        if let Expect::PubComp(pkid) = expect {
            self.rec_sent.remove(&pkid);
        }
        if was_pingreq && !self.lossy {
            assert_eq!(sent, [Packet::PingResp], "PINGREQ answer");
        }
        match result {
            Err(violation) => self.end(&violation),
            Ok(Event::None) => match publish_qos {
                // A resend: of a message still being stored, or of one whose PUBREC was sent.
                Some((QoS::ExactlyOnce, pkid)) => assert!(
                    self.lossy
                        || self.awaiting_ack.contains(&(pkid, QoS::ExactlyOnce))
                        || self.rec_sent.contains(&pkid),
                    "QoS 2 PUBLISH {pkid} was neither stored nor a resend"
                ),
                Some((qos, pkid)) => panic!("a QoS {qos:?} PUBLISH {pkid} reported nothing"),
                None => {}
            },
            Ok(Event::Connect(request)) => {
                assert!(self.session.is_deciding(), "CONNECT reported without awaiting a decision");
                assert!(!self.session.can_read(), "reading goes on while the CONNECT is decided");
                assert!(sent.is_empty(), "answered before the decision: {sent:?}");
                let id = &request.client_id;
                assert!(!id.is_empty() && id.len() <= self.limits.max_client_id_len, "client id {id:?}");
                assert!(
                    !id.contains(['+', '#', '/']) && !id.chars().any(char::is_control),
                    "client id {id:?}"
                );
                let max = self.limits.max_keepalive_secs;
                if max > 0 {
                    assert!(
                        request.keep_alive_secs <= max,
                        "keepalive {} above {max}",
                        request.keep_alive_secs
                    );
                    assert!(request.keep_alive_secs > 0, "no keepalive granted");
                }
            }
            Ok(Event::Publish { topic, qos, ack, .. }) => {
                let (sent_qos, pkid) = publish_qos.expect("a PUBLISH event for a PUBLISH");
                assert_eq!(qos, sent_qos);
                assert!(!topic.is_empty() && !topic.contains(['+', '#']), "topic {topic:?}");
                assert!(topic.len() <= self.limits.max_topic_bytes, "topic of {} bytes", topic.len());
                assert!(topic.split('/').count() <= self.limits.max_topic_levels, "topic {topic:?}");
                assert_eq!(ack.is_some(), qos != QoS::AtMostOnce, "ack for a QoS {qos:?} message");
                if let Some(id) = ack {
                    self.awaiting_ack.push_back((pkid, qos));
                    self.ids.push(id);
                }
            }
            Ok(Event::Disconnect { .. }) => self.ended = true,
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        let watched = self.reading() || self.session.is_deciding();
        if watched && self.session.deadline().is_some_and(|deadline| deadline <= self.now) {
            let deciding = self.session.is_deciding();
            let violation = self.session.timed_out();
            let sent = self.check_output(Expect::Nothing);
            if deciding {
                assert_eq!(violation, Violation::DecisionTimeout);
                assert!(sent.len() <= 1, "decision timeout: {sent:?}");
            }
            self.end(&violation);
        }
    }

    fn decide(&mut self, d: u8) {
        let deciding = self.session.is_deciding();
        let decision = match d >> 5 {
            0 => ConnectDecision::Refuse(ConnectRefusal::QuotaExceeded),
            1 => ConnectDecision::Refuse(ConnectRefusal::ServerUnavailable),
            2 => ConnectDecision::Refuse(ConnectRefusal::BadUserNameOrPassword),
            3 => ConnectDecision::Refuse(ConnectRefusal::NotAuthorized),
            _ => ConnectDecision::Accept {
                session_present: d & 1 == 1,
                session_expiry_secs: [0, 60, 3600, u32::MAX][usize::from((d >> 1) & 3)],
            },
        };
        let unsendable = self.session.unsendable();
        let result = self.session.decide(decision, self.now);
        let sent = self.check_output(Expect::Nothing);
        if !deciding {
            assert_eq!(result, Ok(()), "a decision without a CONNECT");
            assert!(sent.is_empty(), "a decision without a CONNECT wrote {sent:?}");
            return;
        }
        let dropped = sent.is_empty() && self.session.unsendable() > unsendable;
        match (decision, result) {
            (ConnectDecision::Accept { session_present, .. }, Ok(())) => {
                let present = session_present && !self.clean_start;
                self.accepted = true;
                self.resumed = present;
                let ok = match &sent[..] {
                    [Packet::ConnAck(c)] => {
                        c.code == ConnectReturnCode::Accepted && c.session_present == present
                    }
                    [Packet::ConnAckV5(c)] => {
                        let props = &c.properties;
                        c.reason == ReasonCode::Success
                            && c.session_present == present
                            && props.receive_maximum
                                == Some(u16::try_from(self.limits.max_inflight).unwrap_or(u16::MAX))
                            && props.topic_alias_maximum
                                == (self.limits.max_topic_aliases > 0)
                                    .then_some(self.limits.max_topic_aliases)
                    }
                    _ => dropped,
                };
                assert!(ok, "accepting CONNACK: {sent:?}");
                assert!(self.session.is_connected());
            }
            (ConnectDecision::Refuse(refusal), Err(violation)) => {
                assert_eq!(violation, Violation::ConnectRefused(refusal));
                let ok = match &sent[..] {
                    [Packet::ConnAck(c)] => c.code == refusal.return_code(),
                    [Packet::ConnAckV5(c)] => c.reason == refusal.reason_code(),
                    _ => dropped,
                };
                assert!(ok, "refusing CONNACK: {sent:?}");
                self.end(&violation);
            }
            (decision, result) => panic!("{decision:?} gave {result:?}"),
        }
    }

    fn id(&self, index: u8) -> Option<InflightId> {
        // Now and then an id the session never handed out: it must be ignored.
        if index == u8::MAX {
            return Some(InflightId::from_raw(u64::MAX));
        }
        (!self.ids.is_empty()).then(|| self.ids[usize::from(index) % self.ids.len()])
    }

    fn complete(&mut self, index: u8, outcome: u8) {
        let Some(id) = self.id(index) else { return };
        let outcome = match outcome % 8 {
            0 => Outcome::Failed,
            1 => Outcome::Dropped,
            _ => Outcome::Stored,
        };
        let result = self.session.complete(id, outcome);
        self.released(result);
    }

    /// Checks what releasing acks (after a completion or a refusal) wrote, and how it ended: a
    /// failed message closes the connection; on 3.1.1 so does a refused one, when its turn
    /// comes (it has no error ack), which may be at a later message's completion.
    fn released(&mut self, result: Result<(), Violation>) {
        self.check_output(Expect::Nothing);
        if let Err(violation) = result {
            let v3_refusal = violation == Violation::NotAuthorized && !self.session.version().is_v5();
            assert!(matches!(violation, Violation::StoreFailed(_)) || v3_refusal, "{violation:?}");
            self.end(&violation);
        }
    }

    fn refuse(&mut self, index: u8) {
        let Some(id) = self.id(index) else { return };
        let result = self.session.refuse(id, Refusal::NotAuthorized);
        self.released(result);
    }

    fn undecodable(&mut self, index: u8) {
        let Some(id) = self.id(index) else { return };
        self.session.note_undecodable(id, format!("payload {index} did not decode"));
        self.check_output(Expect::Nothing);
    }

    fn shutdown(&mut self) {
        if self.session.is_connected() {
            self.stopping = true;
        } else {
            self.session.begin_shutdown(self.now, Duration::from_secs(2));
            self.check_output(Expect::Nothing);
        }
    }

    fn taken_over(&mut self) {
        // The gateway registers a connection's client id once it is accepted.
        if !self.accepted {
            return;
        }
        let violation = self.session.taken_over();
        let sent = self.check_output(Expect::Nothing);
        if self.session.version().is_v5() {
            let told =
                matches!(&sent[..], [Packet::DisconnectV5(d)] if d.reason == ReasonCode::SessionTakenOver);
            assert!(told || sent.is_empty() && self.session.unsendable() > 0, "takeover: {sent:?}");
        } else {
            assert!(sent.is_empty(), "3.1.1 takeover wrote {sent:?}");
        }
        self.end(&violation);
    }

    /// The connection closes for `violation`: what it queued was checked; nothing more runs.
    fn end(&mut self, violation: &Violation) {
        // The message and reason code of every violation can be produced.
        let _ = (violation.to_string(), violation.reason_code());
        self.ended = true;
    }

    /// Decodes and checks everything the session queued since the last call, and returns it.
    fn check_output(&mut self, expect: Expect) -> Vec<Packet> {
        let v5 = self.session.version().is_v5();
        let decoder = Decoder {
            version: self.session.version(),
            max_packet_size: usize::MAX,
            max_user_properties: usize::MAX,
        };
        if self.session.unsendable() > self.unsendable_seen {
            self.unsendable_seen = self.session.unsendable();
            self.lossy = true;
        }
        let out = self.session.outgoing();
        let mut sent = Vec::new();
        loop {
            match decoder.decode(out) {
                Ok(Some(packet)) => sent.push(packet),
                Ok(None) => break,
                Err(error) => panic!("the session wrote an undecodable packet ({error}) after {sent:?}"),
            }
        }
        assert!(out.is_empty(), "the session wrote part of a packet after {sent:?}");
        let mut pubcomps = 0;
        let mut recs_again = 0;
        for packet in &sent {
            if v5 {
                assert!(
                    encoded_len(packet) <= self.client_max_packet_size,
                    "{packet:?} exceeds the device's maximum packet size {}",
                    self.client_max_packet_size
                );
            }
            if self.lossy && !matches!(packet, Packet::ConnAck(_) | Packet::ConnAckV5(_)) {
                continue;
            }
            match packet {
                Packet::ConnAck(_) | Packet::ConnAckV5(_) => {
                    self.connacks += 1;
                    assert_eq!(self.connacks, 1, "a second CONNACK: {packet:?}");
                }
                Packet::PubAck(pkid) => self.acked(*pkid, QoS::AtLeastOnce, false),
                Packet::PubAckV5(ack) => self.acked(ack.pkid, QoS::AtLeastOnce, ack.reason.is_error()),
                Packet::PubRec(pkid) | Packet::PubRecV5(crate::mqtt::AckV5 { pkid, .. })
                    if expect == Expect::PubRecAgain(*pkid) && recs_again == 0 =>
                {
                    recs_again += 1;
                }
                Packet::PubRec(pkid) => self.acked(*pkid, QoS::ExactlyOnce, false),
                Packet::PubRecV5(ack) => self.acked(ack.pkid, QoS::ExactlyOnce, ack.reason.is_error()),
                Packet::PubComp(pkid) => {
                    assert_eq!(expect, Expect::PubComp(*pkid), "unexpected {packet:?}");
                    pubcomps += 1;
                }
                Packet::PubCompV5(comp) => {
                    assert_eq!(expect, Expect::PubComp(comp.pkid), "unexpected {packet:?}");
                    let known = self.rec_sent.contains(&comp.pkid) || self.resumed;
                    let reason =
                        if known { ReasonCode::Success } else { ReasonCode::PacketIdentifierNotFound };
                    assert_eq!(comp.reason, reason, "PUBCOMP for PUBREL {}", comp.pkid);
                    pubcomps += 1;
                }
                Packet::SubAck(_)
                | Packet::SubAckV5(_)
                | Packet::UnsubAck(_)
                | Packet::UnsubAckV5(_)
                | Packet::PingResp => {}
                Packet::DisconnectV5(_) => assert!(v5, "a server DISCONNECT on 3.1.1"),
                other => panic!("the server wrote a client packet: {other:?}"),
            }
        }
        match expect {
            _ if self.lossy => {}
            Expect::PubComp(pkid) => assert_eq!(pubcomps, 1, "PUBREL {pkid} answered {sent:?}"),
            Expect::PubRecAgain(pkid) => {
                assert_eq!(recs_again, 1, "resent QoS 2 PUBLISH {pkid} answered {sent:?}")
            }
            Expect::Nothing => {}
        }
        sent
    }

    /// An ack for the oldest unacknowledged message: it must be that one, of its kind.
    fn acked(&mut self, pkid: u16, kind: QoS, error: bool) {
        let oldest = self.awaiting_ack.pop_front();
        assert_eq!(oldest, Some((pkid, kind)), "acks out of receive order or of the wrong kind");
        if kind == QoS::ExactlyOnce && !error {
            self.rec_sent.insert(pkid);
        }
    }
}
