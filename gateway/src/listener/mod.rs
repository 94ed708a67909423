//! Device listeners: one accept-loop shape for every protocol. A connection permit is taken
//! before `accept`, accept errors back off, each connection runs in its own task and span, and
//! one connection's failure never stops the loop.

pub mod admission;
pub mod bridge;
pub mod ingest;
pub mod mqtt;
pub mod tcp;
pub mod throttle;
pub mod tls;
pub mod ws;

/// Who may connect to a listener and what its devices may do: its authentication, its publish
/// rules and its per-connection rates (the last two changed in place by a config reload).
pub struct Controls {
    pub auth: Option<Arc<crate::auth::ListenerAuth>>,
    pub policy: Arc<crate::auth::PublishPolicy>,
    pub rates: Arc<throttle::RateLimits>,
}

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

use admission::{AddressSlot, Admission, Refusal};

static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

/// A new connection, as handed to a protocol's connection task.
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    /// Unique within this process; names the connection in logs and assigned client ids.
    pub id: u64,
    /// Held for the connection's lifetime; returned to the listener's limits when it ends.
    pub permit: ConnectionPermit,
}

/// A connection's place under its listener's limits: a slot of `max_connections` and its
/// source address's share of `max_connections_per_ip`, both returned when dropped.
#[derive(Debug)]
pub struct ConnectionPermit {
    _listener: OwnedSemaphorePermit,
    /// Boxed: every idle connection's task carries this permit, and a pointer is smaller.
    _address: Option<Box<AddressSlot>>,
}

impl ConnectionPermit {
    pub fn new(listener: OwnedSemaphorePermit, address: Option<AddressSlot>) -> Self {
        ConnectionPermit { _listener: listener, _address: address.map(Box::new) }
    }
}

/// Accepts connections until `shutdown` turns true, then waits for the connection tasks (which
/// see the same signal and drain) to end. `serve` runs one connection; a connection
/// `admission` refuses goes to `refuse` instead (answered at once, up to a bound of them at a
/// time; beyond it, closed).
pub async fn accept_loop<F, Fut, R, RFut>(
    listener: TcpListener,
    protocol: &'static str,
    max_connections: usize,
    admission: Option<Arc<Admission>>,
    mut shutdown: watch::Receiver<bool>,
    serve: F,
    refuse: R,
) where
    F: Fn(Accepted) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
    R: Fn(TcpStream, Refusal) -> RFut,
    RFut: Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(max_connections));
    let mut connections = JoinSet::new();
    let mut backoff = Duration::from_millis(5);
    loop {
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            permit = Arc::clone(&limit).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = crate::shutdown::signalled(&mut shutdown) => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = crate::shutdown::signalled(&mut shutdown) => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                let address = match admission.as_ref().map(|a| a.admit(peer.ip(), Instant::now())) {
                    None => None,
                    Some(Ok(slot)) => slot,
                    Some(Err(refusal)) => {
                        drop(permit);
                        tracing::debug!(protocol, %peer, reason = refusal.label(), "connection refused");
                        if let Some(answering) = admission.as_ref().and_then(|a| a.answering()) {
                            let answer = refuse(stream, refusal);
                            connections.spawn(async move {
                                answer.await;
                                drop(answering);
                            });
                        }
                        continue;
                    }
                };
                let permit = ConnectionPermit::new(permit, address);
                let id = NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed);
                let span =
                    tracing::debug_span!("connection", protocol, %peer, id, device = tracing::field::Empty);
                connections.spawn(serve(Accepted { stream, peer, id, permit }).instrument(span));
            }
            Err(error) => {
                // Out of file descriptors or a transient kernel error: wait, then go on.
                tracing::warn!(protocol, %error, ?backoff, "accept failed; backing off");
                drop(permit);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Closes a connection admission control refused, at once (protocols without a way to say
/// why before the close).
pub async fn close_refused(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_millis(200), ByteStream::shutdown(&mut stream)).await;
}

/// A device byte stream (a TCP socket, or the binary messages of a WebSocket), read without
/// holding a buffer while it waits: wait for input with `readable`, then take what is there.
pub trait ByteStream: Send + 'static {
    /// Resolves when input, end of stream or an error is there to take. Cancel-safe.
    fn readable(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// Appends available input to `buf` (which has spare capacity) without waiting; `Ok(0)` is
    /// the end of the stream, `WouldBlock` means nothing was there after all.
    fn try_read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize>;
    fn write_all(&mut self, bytes: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
    fn shutdown(&mut self) -> impl Future<Output = io::Result<()>> + Send;
}

impl ByteStream for TcpStream {
    fn readable(&mut self) -> impl Future<Output = io::Result<()>> + Send {
        // `poll_read_ready` keeps the waker in the socket's registration, so this future is a
        // few bytes (`TcpStream::readable`'s is 150) in every idle connection's task.
        std::future::poll_fn(|cx| self.poll_read_ready(cx))
    }

    fn try_read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        TcpStream::try_read_buf(self, buf)
    }

    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        AsyncWriteExt::write_all(self, bytes).await
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        AsyncWriteExt::shutdown(self).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MqttListenerConfig, TcpListenerConfig, WhenFull};
    use crate::fabric::Fabric;
    use crate::metrics::Metrics;
    use crate::shutdown::ShutdownSignal;

    /// Every connection's task holds its protocol's connection future for its whole life: its
    /// size is most of what an idle connection costs (the rarely used slow paths are boxed to
    /// keep it small). The accept loop wraps it in its tracing span (40 bytes), and tokio
    /// allocates a task as that plus 104 bytes, rounded up to 128 (cache-line aligned): an MQTT
    /// future of at most 880 bytes makes a 1024-byte task, which is also an allocator size
    /// class. 8 bytes more and the task is 1152 bytes, 1280 with mimalloc's rounding: 256 bytes
    /// more per connection. `load-tests/idle.sh` measures the real cost.
    #[tokio::test]
    async fn the_mqtt_and_tcp_connection_futures_stay_small() {
        const MQTT_BOUND: usize = 880;
        let metrics = Arc::new(Metrics::new());
        let (fabric, _rx) = Fabric::new(1, 10, 1 << 20, WhenFull::Block, Arc::clone(&metrics));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = || async {
            let stream = TcpStream::connect(addr).await.unwrap();
            let permit = Arc::new(Semaphore::new(1)).acquire_owned().await.unwrap();
            Accepted { stream, peer: addr, id: 1, permit: ConnectionPermit::new(permit, None) }
        };
        let signal = ShutdownSignal::new();

        let mqtt = Arc::new(mqtt::MqttContext::new(
            MqttListenerConfig::default(),
            fabric.clone(),
            Arc::clone(&metrics),
            weir_proto::SourceProtocol::Mqtt,
        ));
        let future = mqtt::serve(accepted().await, Arc::clone(&mqtt), signal.subscribe());
        let size = std::mem::size_of_val(&future);
        // MQTT was 888 before authentication: its connections now keep the source address
        // (for the failed-login limit) until CONNECT, then a token's expiry, in one 24-byte
        // field, and the run loop a little more for the refusals that close (936). The
        // message and byte rate budget (32 bytes) and its pause timer made it 992. Awaiting
        // what a packet leaves after the match on it (not in its arms, which kept the 80-byte
        // packet step across those awaits), the session's QoS 2 ids as a sorted vector (24
        // bytes less than a HashSet) and the device's Maximum Packet Size as the u32 it is
        // made it 880.
        assert!(size <= MQTT_BOUND, "the MQTT connection future grew to {size} bytes");

        let tcp =
            Arc::new(tcp::TcpContext::new(TcpListenerConfig::default(), fabric, Arc::clone(&metrics), addr));
        let future = tcp::serve(accepted().await, Arc::clone(&tcp), signal.subscribe());
        let size = std::mem::size_of_val(&future);
        assert!(size <= 896, "the TCP connection future grew to {size} bytes");

        // Over TLS the session is boxed (rustls keeps kilobytes per session anyway), and the
        // handshake's state too: the task's future stays about the plain one's size.
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().self_signed(&key).unwrap();
        let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let settings = crate::config::TlsConfig {
            cert_file,
            key_file,
            client_ca_file: None,
            client_auth: None,
            crl_files: Vec::new(),
            identity: None,
            handshake_timeout_ms: 10_000,
            min_version: crate::config::TlsVersion::Tls12,
        };
        let tls = Arc::new(tls::TlsServer::new(&settings, "mqtt", metrics).unwrap());
        let future = mqtt::serve_tls(accepted().await, Arc::clone(&tls), mqtt, signal.subscribe());
        let size = std::mem::size_of_val(&future);
        assert!(size <= MQTT_BOUND + 32, "the MQTT-over-TLS connection future grew to {size} bytes");
        let future = tcp::serve_tls(accepted().await, tls, tcp, signal.subscribe());
        let size = std::mem::size_of_val(&future);
        assert!(size <= 896, "the TCP-over-TLS connection future grew to {size} bytes");
    }
}
