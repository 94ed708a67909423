//! The raw TCP connection task: cuts the byte stream into frames (length-prefixed protobuf or
//! NDJSON lines), learns the device from a hello, submits each message to the shared
//! [`MessageQueue`] (awaiting room in the fabric: backpressure), and writes the in-order
//! replies as each message's outcome becomes known.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;
use weir_proto::SourceProtocol;
use weir_protocols::framing::{parse_hello, write_reply, Frame, FrameError, Framer, Framing};
use weir_protocols::reply::{Reply, Status};

use super::ingest::{IngestContext, MessageQueue, Waiting};
use super::throttle::{self, RateLimits, Throttle};
use super::tls::{TlsByteStream, TlsServer};
use super::{Accepted, ByteStream};
use crate::config::{TcpFraming, TcpListenerConfig};
use crate::fabric::Fabric;
use crate::metrics::{Metrics, ProtocolLabel, ProtocolReasonLabel};
use crate::shutdown::ShutdownWatch;

/// Bytes asked of the socket per read; many small frames arrive in one read.
const READ_CHUNK: usize = 16 * 1024;

/// Metric label of this listener.
const LABEL: &str = "tcp";

/// What every connection of one raw TCP listener shares.
pub struct TcpContext {
    config: TcpListenerConfig,
    framing: Framing,
    ingest: Arc<IngestContext>,
    /// The records' `source`: the listener's address, `tcp://127.0.0.1:7000`.
    source: String,
    /// Each connection's message and byte rate (changed in place by a config reload).
    rates: Arc<RateLimits>,
}

impl TcpContext {
    /// `local_addr` is the bound address (the real port when the config asked for port 0).
    pub fn new(
        config: TcpListenerConfig,
        fabric: Fabric,
        metrics: Arc<Metrics>,
        local_addr: SocketAddr,
    ) -> Self {
        let framing = match config.framing {
            TcpFraming::LengthPrefixed => Framing::LengthPrefixed,
            TcpFraming::Lines => Framing::Lines,
        };
        let ingest = Arc::new(IngestContext::new(
            fabric,
            metrics,
            SourceProtocol::Tcp,
            LABEL,
            config.ack,
            config.keep_raw,
        ));
        let rates = Arc::new(RateLimits::new(config.max_messages_per_s, config.max_bytes_per_s));
        Self { config, framing, ingest, source: format!("tcp://{local_addr}"), rates }
    }

    /// Paces connections by `rates` (the listener's, shared with what a reload changes).
    pub fn with_rates(mut self, rates: Arc<RateLimits>) -> Self {
        self.rates = rates;
        self
    }
}

/// Why a connection ended; the label of `weir_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CloseReason {
    /// The device closed its side (after its last replies were written).
    PeerClosed,
    /// No first frame within `connect_timeout_ms`.
    ConnectTimeout,
    /// Nothing received for `idle_timeout_ms` while weir was waiting for the device.
    IdleTimeout,
    /// A frame over `max_frame_bytes`: answered `too_large`, then closed.
    TooLarge,
    /// A first-frame hello naming a device id weir refuses: answered `undecodable`, then closed.
    InvalidHello,
    /// A hello naming another device than the TLS client certificate: answered
    /// `not_authorized`, then closed.
    IdentityMismatch,
    /// The stream ended inside a length-prefixed frame.
    TruncatedFrame,
    Shutdown,
    Io,
}

impl CloseReason {
    fn label(self) -> &'static str {
        match self {
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::ConnectTimeout => "connect_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::TooLarge => "too_large",
            CloseReason::InvalidHello => "invalid_hello",
            CloseReason::IdentityMismatch => "identity_mismatch",
            CloseReason::TruncatedFrame => "truncated_frame",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Io => "io_error",
        }
    }
}

/// Serves one raw TCP connection until it closes or shutdown drains it.
pub fn serve(
    accepted: Accepted,
    ctx: Arc<TcpContext>,
    shutdown: ShutdownWatch,
) -> impl std::future::Future<Output = ()> + Send {
    let Accepted { stream, permit, .. } = accepted;
    // Replies are small and latency matters more than packet count.
    let _ = stream.set_nodelay(true);
    // The connection future is the task itself (no async wrapper keeping `accepted` or a second
    // copy of the future): its size is what every idle connection costs.
    serve_stream(stream, ctx, shutdown, Some(permit), None)
}

/// Serves one raw TCP connection over TLS: the handshake (under its deadline, in this task),
/// then frames. With mutual TLS, the client certificate's identity is the connection's device:
/// no hello is needed, and a hello naming another device is refused.
pub fn serve_tls(
    accepted: Accepted,
    tls: Arc<TlsServer>,
    ctx: Arc<TcpContext>,
    shutdown: ShutdownWatch,
) -> impl std::future::Future<Output = ()> + Send {
    // The handshake's state is large and gone once it is done: it lives in its own box, and
    // the task's future is the plain connection's plus that box.
    let handshake = Box::pin(async move {
        let Accepted { stream, permit, .. } = accepted;
        let _ = stream.set_nodelay(true);
        let mut shutdown = shutdown;
        let handshaken = tls.handshake_until(stream, shutdown.fired()).await?;
        Some((handshaken, permit, shutdown))
    });
    async move {
        let Some((handshaken, permit, shutdown)) = handshake.await else { return };
        let stream = TlsByteStream::new(handshaken.stream);
        serve_stream(stream, ctx, shutdown, Some(permit), handshaken.identity).await
    }
}

/// Serves one raw TCP connection over any byte stream.
/// `permit` (the listener's connection slot) is released when the connection ends;
/// `identity` is the device identity of a TLS client certificate.
pub fn serve_stream<S: ByteStream>(
    stream: S,
    ctx: Arc<TcpContext>,
    shutdown: ShutdownWatch,
    permit: Option<super::ConnectionPermit>,
    identity: Option<Arc<str>>,
) -> impl std::future::Future<Output = ()> + Send {
    // Built before the future, which then holds the connection but not the arguments it was
    // made from (an `async fn` would keep both for the connection's life).
    let mut connection = Connection {
        // A certified device writes its own records only; others are refused (not_authorized).
        queue: MessageQueue::new(Arc::clone(&ctx.ingest), ctx.config.max_inflight).owned_by(identity.clone()),
        framer: Framer::new(ctx.framing, ctx.config.max_frame_bytes),
        ctx,
        stream,
        certified: identity.is_some(),
        device: identity.map(|id| id.to_string()).unwrap_or_default(),
        seen_first_message: false,
        replies: Vec::new(),
        throttle: Throttle::default(),
    };
    async move {
        let metrics = Arc::clone(&connection.ctx.ingest.metrics);
        let label = ProtocolLabel { protocol: LABEL };
        metrics.connections_opened.get_or_create(&label).inc();
        metrics.connections_active.get_or_create(&label).inc();
        let closed = connection.run(shutdown).await;
        tracing::debug!(reason = closed.label(), "connection closed");
        metrics.connections_active.get_or_create(&label).dec();
        metrics
            .connections_closed
            .get_or_create(&ProtocolReasonLabel { protocol: LABEL, reason: closed.label() })
            .inc();
        drop(permit);
    }
}

struct Connection<S> {
    ctx: Arc<TcpContext>,
    stream: S,
    queue: MessageQueue,
    framer: Framer,
    /// Named by the hello or the TLS client certificate; empty without either (each reading
    /// must then name its device).
    device: String,
    /// `device` is the TLS client certificate's identity; a hello may only repeat it.
    certified: bool,
    /// Whether the first message (hello or not) has been read; only it may be a hello.
    seen_first_message: bool,
    /// Scratch space for the replies of one write, reused.
    replies: Vec<Reply>,
    /// The device's message and byte budget; over it, the connection is not read for a while.
    throttle: Throttle,
}

impl<S: ByteStream> Connection<S> {
    async fn run(&mut self, mut shutdown: ShutdownWatch) -> CloseReason {
        let connect_deadline = Instant::now() + Duration::from_millis(self.ctx.config.connect_timeout_ms);
        let idle_timeout =
            Some(self.ctx.config.idle_timeout_ms).filter(|&ms| ms > 0).map(Duration::from_millis);
        // Allocated when input arrives and released when drained: an idle connection holds none.
        let mut buf = BytesMut::new();
        // A first frame (message or heartbeat) arrived: the connect deadline no longer applies.
        let mut framed = false;
        // The device closed its sending side; what it sent is still answered.
        let mut input_ended = false;
        let mut last_input = Instant::now();
        // Whether the idle clock ran on the previous turn; restarting it starts a fresh period.
        let mut idle_clock_was_running = true;
        // `None` while reading; the reason once reading stopped and only replies remain to send.
        let mut stopped: Option<CloseReason> = None;
        loop {
            // Replies that became ready free their in-flight slots: send them before reading on.
            if let Err(closed) = self.flush().await {
                return closed;
            }
            while stopped.is_none() && self.queue.can_read() && !self.throttle.is_paused() {
                let next = match self.framer.decode(&mut buf) {
                    Ok(None) if input_ended => {
                        let last = self.framer.finish(&mut buf);
                        if last == Ok(None) {
                            stopped = Some(CloseReason::PeerClosed);
                        }
                        last
                    }
                    other => other,
                };
                match next {
                    Ok(None) => break,
                    Ok(Some(frame)) => {
                        framed = true;
                        // Only a whole frame counts as input: a device trickling bytes that
                        // never complete one is closed at the idle deadline (slowloris).
                        let now = Instant::now();
                        last_input = now;
                        if let Frame::Message(body) = &frame {
                            if let Some(pause) = self.throttle.charge(&self.ctx.rates, body.len(), now) {
                                throttle::count_pause(&self.ctx.ingest.metrics, LABEL, pause, now);
                            }
                        }
                        match self.on_frame(frame) {
                            Ok(None) => {}
                            Ok(Some(waiting)) => {
                                // The fabric is full: wait for room (boxed, so that every
                                // connection's task does not carry this future while it idles).
                                if Box::pin(self.queue.enqueue_waiting(waiting)).await.is_err() {
                                    stopped = Some(CloseReason::Shutdown);
                                }
                                // Waiting for room is weir's delay, not the device's silence.
                                last_input = Instant::now();
                            }
                            Err(reason) => stopped = Some(reason),
                        }
                    }
                    Err(error @ FrameError::TooLarge { .. }) => {
                        tracing::debug!(%error, "frame too large; answering and closing");
                        self.queue.refuse(
                            self.ctx.framing.reply_format(),
                            Status::TooLarge,
                            error.to_string(),
                        );
                        stopped = Some(CloseReason::TooLarge);
                    }
                    Err(error @ FrameError::Truncated { .. }) => {
                        tracing::debug!(%error, "stream ended inside a frame");
                        self.ctx.ingest.count_error("truncated_frame");
                        stopped = Some(CloseReason::TruncatedFrame);
                    }
                }
            }
            if let Err(closed) = self.flush().await {
                return closed;
            }
            if let Some(reason) = stopped {
                // Reading is over; leave once every message read has its answer.
                if self.queue.pending() == 0 {
                    let _ = self.stream.shutdown().await;
                    return reason;
                }
            }
            let paused = stopped.is_none() && self.throttle.is_paused();
            let reading = stopped.is_none() && !input_ended && self.queue.can_read() && !paused;
            // The idle clock runs only while weir waits for the device: not while it holds the
            // device back (at max_inflight) or still owes it replies.
            let idle_clock_running = reading && self.queue.pending() == 0;
            if idle_clock_running && !idle_clock_was_running {
                last_input = Instant::now();
            }
            idle_clock_was_running = idle_clock_running;
            // What the timer is for: closing the connection, or (`None`) ending a pause.
            let deadline = match stopped {
                Some(_) => None,
                None if paused => self.throttle.paused_until().map(|at| (at, None)),
                None if !framed => Some((connect_deadline, Some(CloseReason::ConnectTimeout))),
                None if idle_clock_running => {
                    idle_timeout.map(|t| (last_input + t, Some(CloseReason::IdleTimeout)))
                }
                None => None,
            };
            if buf.is_empty() {
                // Keep nothing from a busy moment while waiting: an idle connection holds only
                // its state.
                if buf.capacity() > 0 {
                    buf = BytesMut::new();
                }
                if self.replies.capacity() > 0 {
                    self.replies = Vec::new();
                }
                self.queue.release_idle_memory();
            }
            tokio::select! {
                ready = self.stream.readable(), if reading => {
                    if let Err(error) = ready {
                        tracing::debug!(%error, "read failed");
                        return CloseReason::Io;
                    }
                    buf.reserve(READ_CHUNK);
                    match self.stream.try_read_buf(&mut buf) {
                        Ok(0) => input_ended = true,
                        Ok(_) => {}
                        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(error) => {
                            tracing::debug!(%error, "read failed");
                            return CloseReason::Io;
                        }
                    }
                },
                event = self.queue.next_outcome() => self.queue.apply(event),
                _ = sleep_until_some(deadline.map(|(at, _)| at)) => {
                    let Some(reason) = deadline.map_or(Some(CloseReason::IdleTimeout), |(_, reason)| reason) else {
                        self.throttle.resume_if_due(Instant::now());
                        continue;
                    };
                    tracing::debug!(reason = reason.label(), "device silent; closing");
                    self.ctx.ingest.count_error(reason.label());
                    let _ = self.stream.shutdown().await;
                    return reason;
                },
                _ = shutdown.fired(), if stopped.is_none() => {
                    stopped = Some(CloseReason::Shutdown);
                },
            }
        }
    }

    /// Handles one frame: a heartbeat, the hello, or a message to submit (which waits for room
    /// in the fabric, so frame n+1 is not read before frame n is in).
    fn on_frame(&mut self, frame: Frame) -> Result<Option<Waiting>, CloseReason> {
        let Frame::Message(body) = frame else { return Ok(None) };
        let framing = self.ctx.framing;
        let first = !self.seen_first_message;
        self.seen_first_message = true;
        // A later protobuf hello is left to the payload decoder, which dead-letters it; a JSON
        // one would decode as a reading, so lines are checked (a cheap prefix test first).
        if first || framing == Framing::Lines {
            match parse_hello(framing, &body) {
                Ok(None) => {}
                Ok(Some(device)) if first && self.certified && device != self.device => {
                    let reason = format!(
                        "the hello names device {device:?}, the client certificate {:?}",
                        self.device
                    );
                    tracing::debug!(%reason, "hello refused");
                    self.ctx.ingest.count_error("identity_mismatch");
                    self.queue.refuse(self.ctx.framing.reply_format(), Status::NotAuthorized, reason);
                    return Err(CloseReason::IdentityMismatch);
                }
                Ok(Some(device)) if first => {
                    tracing::Span::current().record("device", device.as_str());
                    self.device = device;
                    return Ok(None);
                }
                Ok(Some(_)) => {
                    let reason =
                        "a hello (device identification) is only valid as the first line of a connection";
                    return self.dead_letter(body, reason.to_owned());
                }
                Err(error) if first => {
                    tracing::debug!(%error, "hello refused");
                    self.refuse_undecodable(&error.to_string());
                    // Without a usable identity the device's readings would be nobody's.
                    return Err(CloseReason::InvalidHello);
                }
                Err(error) => return self.dead_letter(body, error.to_string()),
            }
        }
        let framing = self.ctx.framing;
        self.queue
            .submit_now(
                &self.device,
                &self.ctx.source,
                framing.payload_format(),
                framing.reply_format(),
                body,
            )
            .map_err(|_closing| CloseReason::Shutdown)
    }

    /// Stores an out-of-place frame as a dead letter and answers it `undecodable`.
    fn dead_letter(&mut self, body: Bytes, reason: String) -> Result<Option<Waiting>, CloseReason> {
        let reply_format = self.ctx.framing.reply_format();
        self.queue
            .dead_letter_now(&self.device, &self.ctx.source, reply_format, body, reason)
            .map_err(|_closing| CloseReason::Shutdown)
    }

    fn refuse_undecodable(&mut self, reason: &str) {
        self.queue.refuse(self.ctx.framing.reply_format(), Status::Undecodable, reason.to_owned());
    }

    /// Writes every reply that is ready, in message order, in one write.
    async fn flush(&mut self) -> Result<(), CloseReason> {
        self.queue.take_replies(&mut self.replies);
        if self.replies.is_empty() {
            return Ok(());
        }
        let mut out = Vec::with_capacity(self.replies.len() * 24);
        for reply in self.replies.drain(..) {
            write_reply(self.ctx.framing, &reply, &mut out);
        }
        self.stream.write_all(&out).await.map_err(|error| {
            tracing::debug!(%error, "write failed");
            CloseReason::Io
        })
    }
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
