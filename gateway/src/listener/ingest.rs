//! Message-oriented ingest, shared by WebSocket `/ingest`, raw TCP and HTTP `POST /ingest`: a
//! device message is decoded into records (or one dead letter), enqueued with ack shares, and
//! answered in message order once its outcome is known (after the commit, per the ack point).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use weir_proto::{Record, SourceProtocol};
use weir_protocols::mqtt::session::Outcome;
use weir_protocols::payload::{self, DecodeContext, PayloadFormat, PayloadLimits};
use weir_protocols::reply::{Reply, ReplyFormat, Status};

use crate::ack::{AckEvent, AckInbox, AckToken};
use crate::config::AckPoint;
use crate::fabric::{message_items, DeadLetter, Fabric, Item, MessageMeta, SendError};
use crate::metrics::{Metrics, ProtocolLabel, ProtocolReasonLabel, ReasonLabel};

/// What every connection of one message-oriented listener shares.
pub struct IngestContext {
    pub fabric: Fabric,
    pub metrics: Arc<Metrics>,
    pub protocol: SourceProtocol,
    /// The protocol label of this listener's metrics (`ws`, `tcp`, `http`).
    pub label: &'static str,
    pub ack: AckPoint,
    pub keep_raw: bool,
    messages_received: Counter,
}

impl IngestContext {
    pub fn new(
        fabric: Fabric,
        metrics: Arc<Metrics>,
        protocol: SourceProtocol,
        label: &'static str,
        ack: AckPoint,
        keep_raw: bool,
    ) -> Self {
        let messages_received =
            metrics.messages_received.get_or_create(&ProtocolLabel { protocol: label }).clone();
        Self { fabric, metrics, protocol, label, ack, keep_raw, messages_received }
    }

    /// Counts a protocol error of this listener (oversized frame, bad hello, ...).
    pub fn count_error(&self, reason: &'static str) {
        self.metrics
            .protocol_errors
            .get_or_create(&ProtocolReasonLabel { protocol: self.label, reason })
            .inc();
    }
}

/// The fabric is closing: the connection should stop reading and leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closing;

/// A message whose items did not all fit in the fabric at once: the rest wait for room, with
/// [`MessageQueue::enqueue_waiting`].
pub struct Waiting {
    n: u64,
    items: Vec<Item>,
    /// Acked through its token (after the commit or the buffer's sync), not on enqueue.
    tracked: bool,
}

/// One message awaiting its outcome.
#[derive(Debug)]
struct Pending {
    n: u64,
    seq: Option<u64>,
    format: ReplyFormat,
    /// Set for a dead letter: the reply once it is stored.
    undecodable: Option<String>,
    /// `None` until the outcome is known.
    status: Option<(Status, String)>,
}

/// A connection's messages in flight, in receive order, and their replies.
pub struct MessageQueue {
    ctx: Arc<IngestContext>,
    max_inflight: usize,
    next_n: u64,
    pending: VecDeque<Pending>,
    /// Outcome reports of this connection's messages.
    inbox: Arc<AckInbox>,
    /// Scratch space for one message's records, reused.
    records: Vec<Record>,
    /// Answer "unavailable" at once instead of waiting when the fabric is full (HTTP).
    busy_is_error: bool,
    /// The authenticated device: a message with a record naming another is refused
    /// (`not_authorized`, counted in `weir_acl_denied_total`).
    owner: Option<Arc<str>>,
}

impl MessageQueue {
    /// A queue that lets at most `max_inflight` messages await their reply.
    pub fn new(ctx: Arc<IngestContext>, max_inflight: usize) -> Self {
        Self {
            ctx,
            max_inflight,
            next_n: 1,
            pending: VecDeque::new(),
            inbox: AckInbox::new(),
            records: Vec::new(),
            busy_is_error: false,
            owner: None,
        }
    }

    /// Refuses messages with records of any device but `owner` (the authenticated identity).
    pub fn owned_by(mut self, owner: Option<Arc<str>>) -> Self {
        self.owner = owner;
        self
    }

    /// A queue whose messages are refused with "unavailable" when the fabric has no room, instead
    /// of waiting for it: for requests that must be answered promptly (HTTP webhooks).
    pub fn answering_busy(ctx: Arc<IngestContext>, max_inflight: usize) -> Self {
        Self { busy_is_error: true, ..Self::new(ctx, max_inflight) }
    }

    pub fn context(&self) -> &Arc<IngestContext> {
        &self.ctx
    }

    /// Gives back the room a busy moment left in the queue's buffers, once nothing is in
    /// flight. Call it when the connection goes idle.
    pub fn release_idle_memory(&mut self) {
        if self.pending.is_empty() && self.pending.capacity() > 0 {
            self.pending = VecDeque::new();
        }
        if self.records.capacity() > 0 {
            self.records = Vec::new();
        }
        self.inbox.release_idle_memory();
    }

    /// Whether another message may be read: fewer than `max_inflight` await their reply.
    pub fn can_read(&self) -> bool {
        self.pending.len() < self.max_inflight
    }

    /// Messages read and not yet answered (replies ready but not taken count too).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Decodes one message from `device_id` and enqueues its records, or its dead letter when it
    /// does not decode. Waits for room in the fabric (backpressure), applying outcomes that
    /// arrive meanwhile. The reply is ready once the message's outcome is known.
    pub async fn submit(
        &mut self,
        device_id: &str,
        source: &str,
        format: PayloadFormat,
        reply_format: ReplyFormat,
        payload: Bytes,
    ) -> Result<(), Closing> {
        match self.submit_now(device_id, source, format, reply_format, payload)? {
            None => Ok(()),
            // The fabric is full: wait for room (boxed, so that every connection's task does not
            // carry this rarely used future inline while it idles).
            Some(waiting) => Box::pin(self.enqueue_waiting(waiting)).await,
        }
    }

    /// [`MessageQueue::submit`] up to the first record the fabric has no room for now; the
    /// synchronous hot path.
    pub fn submit_now(
        &mut self,
        device_id: &str,
        source: &str,
        format: PayloadFormat,
        reply_format: ReplyFormat,
        payload: Bytes,
    ) -> Result<Option<Waiting>, Closing> {
        let ctx = Arc::clone(&self.ctx);
        ctx.messages_received.inc();
        let n = self.next_n;
        self.next_n += 1;
        let tracked = ctx.ack != AckPoint::Received;
        let received_ts_ms = now_ms();
        let decoded = {
            let decode_ctx = DecodeContext {
                fallback_device_id: device_id,
                protocol: ctx.protocol,
                source,
                received_ts_ms,
                keep_raw: ctx.keep_raw,
                limits: PayloadLimits::default(),
            };
            payload::decode(format, &payload, &decode_ctx, &mut self.records)
        };
        // Checked before the ack token is made: a token dropped unsettled counts as a failure.
        if let (Some(owner), Ok(())) = (&self.owner, &decoded) {
            if let Some(other) = self.records.iter().find(|r| *r.device_id != **owner) {
                let reason =
                    format!("a record names device {:?}; this connection is {owner:?}", other.device_id);
                self.records.clear();
                ctx.metrics.acl_denied.get_or_create(&ProtocolLabel { protocol: ctx.label }).inc();
                tracing::debug!(%reason, "message not authorized");
                let status = Some((Status::NotAuthorized, reason));
                self.pending.push_back(Pending {
                    n,
                    seq: None,
                    format: reply_format,
                    undecodable: None,
                    status,
                });
                return Ok(None);
            }
        }
        let token = AckToken::for_point(ctx.ack, n, &self.inbox);
        let mut pending = Pending { n, seq: None, format: reply_format, undecodable: None, status: None };
        let mut items = Vec::new();
        let meta = MessageMeta::new(&payload, format);
        match decoded {
            Ok(()) => {
                ctx.metrics.records_decoded.inc_by(self.records.len() as u64);
                pending.seq = self.records.iter().filter_map(|r| r.seq).max();
                message_items(&mut self.records, token, meta, &mut items);
            }
            Err(error) => {
                let reason = error.to_string();
                if crate::logs::DEAD_LETTERS.allow() {
                    tracing::warn!(%reason, device = device_id, source, "message not decodable; dead-lettered");
                }
                pending.undecodable = Some(reason.clone());
                let letter = self.dead_letter(device_id, source, payload, reason, received_ts_ms, token);
                items.push(letter.of_message(meta));
            }
        }
        self.enqueue_now(pending, items, tracked)
    }

    /// Stores a message the listener itself found invalid (e.g. a hello out of place) as a dead
    /// letter with `reason`, and answers it `undecodable` once that is committed. Synchronous, as
    /// [`MessageQueue::submit_now`]: what has to wait for room is returned.
    pub fn dead_letter_now(
        &mut self,
        device_id: &str,
        source: &str,
        reply_format: ReplyFormat,
        payload: Bytes,
        reason: String,
    ) -> Result<Option<Waiting>, Closing> {
        self.ctx.messages_received.inc();
        let n = self.next_n;
        self.next_n += 1;
        let tracked = self.ctx.ack != AckPoint::Received;
        let token = AckToken::for_point(self.ctx.ack, n, &self.inbox);
        let pending =
            Pending { n, seq: None, format: reply_format, undecodable: Some(reason.clone()), status: None };
        let meta = MessageMeta::new(&payload, PayloadFormat::Auto);
        let item = self.dead_letter(device_id, source, payload, reason, now_ms(), token).of_message(meta);
        self.enqueue_now(pending, vec![item], tracked)
    }

    fn dead_letter(
        &self,
        device_id: &str,
        source: &str,
        raw: Bytes,
        error: String,
        received_ts_ms: i64,
        token: Option<AckToken>,
    ) -> Item {
        self.ctx.metrics.records_dead_lettered.get_or_create(&ReasonLabel { reason: "undecodable" }).inc();
        let letter = DeadLetter {
            device_id: device_id.to_owned(),
            protocol: self.ctx.protocol,
            source: source.to_owned(),
            error,
            raw,
            received_ts_ms,
        };
        Item::dead_letter(letter, token)
    }

    /// Registers the message and enqueues its items where the fabric has room now; returns
    /// the rest, to wait for room.
    fn enqueue_now(
        &mut self,
        pending: Pending,
        items: Vec<Item>,
        tracked: bool,
    ) -> Result<Option<Waiting>, Closing> {
        let n = pending.n;
        self.pending.push_back(pending);
        let mut items = items.into_iter();
        while let Some(item) = items.next() {
            match self.ctx.fabric.try_send_now(item) {
                Ok(()) => {}
                Err(SendError::Full(item)) => {
                    let rest = std::iter::once(item).chain(items).collect();
                    return Ok(Some(Waiting { n, items: rest, tracked }));
                }
                Err(SendError::Closed(item)) => {
                    item.settle(Outcome::Failed);
                    return Err(Closing);
                }
            }
        }
        if !tracked {
            // `ack = "received"`: answered once the message is in the fabric.
            self.complete(n, Outcome::Stored);
        }
        Ok(None)
    }

    /// Enqueues what [`MessageQueue::enqueue_now`] could not, waiting for room (or answering
    /// busy), while outcomes of earlier messages keep being applied.
    pub async fn enqueue_waiting(&mut self, waiting: Waiting) -> Result<(), Closing> {
        let Waiting { n, items, tracked } = waiting;
        let mut worst = Outcome::Stored;
        for item in items {
            let stored = self.enqueue(item).await?;
            if stored != Outcome::Stored {
                worst = stored;
            }
        }
        if !tracked {
            self.complete(n, worst);
        }
        Ok(())
    }

    /// Answers a message that is not stored at all (too large, not authorized), in order.
    pub fn refuse(&mut self, reply_format: ReplyFormat, status: Status, reason: String) {
        self.ctx.messages_received.inc();
        let n = self.next_n;
        self.next_n += 1;
        self.pending.push_back(Pending {
            n,
            seq: None,
            format: reply_format,
            undecodable: None,
            status: Some((status, reason)),
        });
    }

    async fn enqueue(&mut self, item: Item) -> Result<Outcome, Closing> {
        let fabric = self.ctx.fabric.clone();
        let busy_is_error = self.busy_is_error;
        let send = async {
            if busy_is_error {
                fabric.try_send(item).await
            } else {
                fabric.send(item).await
            }
        };
        tokio::pin!(send);
        loop {
            tokio::select! {
                sent = &mut send => return match sent {
                    Ok(()) => Ok(Outcome::Stored),
                    Err(SendError::Full(item)) if busy_is_error => {
                        // Not a drop: the device is told to resend (HTTP 503 + Retry-After).
                        self.ctx.count_error("busy");
                        item.settle(Outcome::Dropped);
                        Ok(Outcome::Dropped)
                    }
                    other => fabric.settle_send(other).map_err(|_| Closing),
                },
                // Outcomes of earlier messages keep arriving while this one waits for room.
                event = self.inbox.next() => self.apply(event),
            }
        }
    }

    /// Waits for the next outcome report; apply it with [`MessageQueue::apply`].
    pub async fn next_outcome(&self) -> AckEvent {
        self.inbox.next().await
    }

    /// Records an outcome report, and every other one already waiting.
    pub fn apply(&mut self, (n, outcome): AckEvent) {
        self.complete(n, outcome);
        while let Some((n, outcome)) = self.inbox.try_next() {
            self.complete(n, outcome);
        }
    }

    fn complete(&mut self, n: u64, outcome: Outcome) {
        let Some(front) = self.pending.front().map(|p| p.n) else { return };
        let Some(pending) = n.checked_sub(front).and_then(|i| self.pending.get_mut(i as usize)) else {
            return;
        };
        pending.status = Some(match (outcome, pending.undecodable.take()) {
            (Outcome::Stored, None) => (Status::Ok, String::new()),
            (Outcome::Stored, Some(reason)) => (Status::Undecodable, reason),
            (Outcome::Dropped, _) if self.busy_is_error => {
                (Status::Unavailable, "the gateway is busy; resend after a moment".into())
            }
            (Outcome::Dropped, _) => (
                Status::Unavailable,
                "dropped: the gateway is full (when_full = drop_newest); resend later".into(),
            ),
            (Outcome::Failed, _) => (Status::Unavailable, "not stored: the sink failed; resend later".into()),
        });
    }

    /// Moves the replies that are ready, in message order, into `out`.
    pub fn take_replies(&mut self, out: &mut Vec<Reply>) {
        while self.pending.front().is_some_and(|p| p.status.is_some()) {
            let Some(p) = self.pending.pop_front() else { break };
            let Some((status, reason)) = p.status else { break };
            if status != Status::Ok {
                self.ctx
                    .metrics
                    .protocol_errors
                    .get_or_create(&ProtocolReasonLabel { protocol: self.ctx.label, reason: status.as_str() })
                    .inc();
            }
            out.push(Reply { n: p.n, seq: p.seq, status, reason, format: p.format });
        }
    }
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WhenFull;

    fn queue(ack: AckPoint, max_inflight: usize) -> (MessageQueue, Vec<crate::fabric::ShardReceiver>) {
        let metrics = Arc::new(Metrics::new());
        let (fabric, rx) = Fabric::new(1, 100, 1 << 20, WhenFull::Block, Arc::clone(&metrics));
        let ctx = IngestContext::new(fabric, metrics, SourceProtocol::Tcp, "tcp", ack, false);
        (MessageQueue::new(Arc::new(ctx), max_inflight), rx)
    }

    #[tokio::test]
    async fn replies_wait_for_the_commit_and_leave_in_order() {
        let (mut q, rx) = queue(AckPoint::Committed, 4);
        q.submit(
            "d1",
            "tcp",
            PayloadFormat::Json,
            ReplyFormat::Json,
            Bytes::from_static(br#"{"seq":5,"t":1}"#),
        )
        .await
        .unwrap();
        q.submit("d1", "tcp", PayloadFormat::Json, ReplyFormat::Json, Bytes::from_static(b"not json"))
            .await
            .unwrap();
        let mut replies = Vec::new();
        q.take_replies(&mut replies);
        assert!(replies.is_empty(), "nothing is answered before its commit");
        let first = rx[0].items_rx.try_recv().unwrap();
        let second = rx[0].items_rx.try_recv().unwrap();
        // The second message's outcome arrives first; its reply still waits for the first.
        second.settle(Outcome::Stored);
        let event = q.next_outcome().await;
        q.apply(event);
        q.take_replies(&mut replies);
        assert!(replies.is_empty());
        first.settle(Outcome::Stored);
        let event = q.next_outcome().await;
        q.apply(event);
        q.take_replies(&mut replies);
        assert_eq!(replies.len(), 2);
        assert_eq!((replies[0].n, replies[0].seq, replies[0].status), (1, Some(5), Status::Ok));
        assert_eq!((replies[1].n, replies[1].status), (2, Status::Undecodable));
        assert!(replies[1].reason.contains("JSON"), "{}", replies[1].reason);
        assert_eq!(q.pending(), 0);
    }

    #[tokio::test]
    async fn a_failed_commit_is_answered_unavailable_and_in_flight_is_bounded() {
        let (mut q, rx) = queue(AckPoint::Committed, 2);
        q.submit(
            "d1",
            "tcp",
            PayloadFormat::Json,
            ReplyFormat::Protobuf,
            Bytes::from_static(br#"[{"seq":1,"t":1},{"seq":2,"t":2}]"#),
        )
        .await
        .unwrap();
        assert!(q.can_read());
        q.refuse(ReplyFormat::Protobuf, Status::TooLarge, "too big".into());
        assert!(!q.can_read(), "two messages await their reply");
        let a = rx[0].items_rx.try_recv().unwrap();
        let b = rx[0].items_rx.try_recv().unwrap();
        a.settle(Outcome::Stored);
        drop(b); // a share dropped unsettled: the message failed
        let event = q.next_outcome().await;
        q.apply(event);
        let mut replies = Vec::new();
        q.take_replies(&mut replies);
        assert_eq!(replies.len(), 2);
        assert_eq!((replies[0].seq, replies[0].status), (Some(2), Status::Unavailable));
        assert_eq!((replies[1].n, replies[1].status), (2, Status::TooLarge));
    }

    #[tokio::test]
    async fn received_ack_point_answers_on_enqueue() {
        let (mut q, _rx) = queue(AckPoint::Received, 4);
        q.submit(
            "d1",
            "tcp",
            PayloadFormat::Json,
            ReplyFormat::Json,
            Bytes::from_static(br#"{"seq":1,"t":1}"#),
        )
        .await
        .unwrap();
        let mut replies = Vec::new();
        q.take_replies(&mut replies);
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].status, Status::Ok);
    }
}
