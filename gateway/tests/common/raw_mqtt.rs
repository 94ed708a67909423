//! A deliberately simple MQTT client (3.1.1 or 5) over weir's own codec, for exact control of
//! the bytes sent and of what is expected back; over TCP, or any stream (TLS) with [`RawClient::over`].

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use weir_protocols::mqtt::{
    encode, ConnAck, ConnAckV5, Connect, ConnectV5, Decoder, DisconnectV5, Packet, Properties,
    ProtocolVersion, ReasonCode,
};

/// Bound for an answer that should come "at once" (a CONNACK, the close after a DISCONNECT).
const PROMPTLY: Duration = Duration::from_secs(5);

/// One MQTT connection to weir, decoding what it receives as `version` does.
pub struct RawClient<S = TcpStream> {
    pub stream: S,
    buf: BytesMut,
    version: ProtocolVersion,
}

impl RawClient {
    /// An MQTT 3.1.1 connection, CONNECT not sent.
    pub async fn open(addr: SocketAddr) -> Self {
        Self::open_as(addr, ProtocolVersion::V311).await
    }

    /// A connection that will speak `version`, CONNECT not sent.
    pub async fn open_as(addr: SocketAddr, version: ProtocolVersion) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Self::over(stream, version)
    }

    /// Connects from a chosen local address such as `127.0.0.2` (weir's failed-login limit is
    /// per source address).
    pub async fn open_from(addr: SocketAddr, version: ProtocolVersion, source_ip: &str) -> Self {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source_ip}:0").parse().unwrap()).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Self::over(stream, version)
    }

    /// Opens a 3.1.1 connection and completes CONNECT/CONNACK, which must accept.
    pub async fn connect(addr: SocketAddr, client_id: &str) -> Self {
        let mut client = Self::open(addr).await;
        client.send(&super::connect_packet(client_id)).await;
        match client.recv().await {
            Some(Packet::ConnAck(ack)) => assert_eq!(ack.code as u8, 0, "CONNACK refused"),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        client
    }

    /// Opens a 3.1.1 connection, sends `connect` and returns weir's CONNACK, whatever its code.
    pub async fn connect_v311(addr: SocketAddr, connect: Connect) -> (Self, ConnAck) {
        let mut client = Self::open(addr).await;
        client.send(&Packet::Connect(connect)).await;
        match client.recv_within(PROMPTLY).await {
            Ok(Some(Packet::ConnAck(connack))) => (client, connack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Opens an MQTT 5 connection, sends `connect` and returns weir's CONNACK, whatever its
    /// reason code.
    pub async fn connect_v5(addr: SocketAddr, connect: ConnectV5) -> (Self, ConnAckV5) {
        let mut client = Self::open_as(addr, ProtocolVersion::V5).await;
        client.send(&Packet::ConnectV5(Box::new(connect))).await;
        match client.recv_within(PROMPTLY).await {
            Ok(Some(Packet::ConnAckV5(connack))) => (client, connack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawClient<S> {
    /// A client on an already open stream (a TLS session, say), CONNECT not sent.
    pub fn over(stream: S, version: ProtocolVersion) -> Self {
        Self { stream, buf: BytesMut::new(), version }
    }

    /// The protocol version the client decodes as.
    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    pub async fn send(&mut self, packet: &Packet) {
        self.try_send(packet).await.unwrap();
    }

    /// Sends `packet`; the write error when weir has already closed the connection.
    pub async fn try_send(&mut self, packet: &Packet) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        encode(packet, &mut out);
        self.send_raw(&out).await
    }

    /// Sends bytes as they are, valid MQTT or not.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        // Nothing for TCP; TLS holds written bytes until flushed.
        self.stream.flush().await
    }

    /// The next packet from weir, or None when weir closed the connection.
    pub async fn recv(&mut self) -> Option<Packet> {
        let decoder = Decoder::new(self.version, 1 << 20);
        loop {
            if let Some(packet) = decoder.decode(&mut self.buf).expect("weir sent a malformed packet") {
                return Some(packet);
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// The next packet within `wait`, `Err(())` on timeout.
    pub async fn recv_within(&mut self, wait: Duration) -> Result<Option<Packet>, ()> {
        tokio::time::timeout(wait, self.recv()).await.map_err(|_| ())
    }

    /// True when weir closes the connection (EOF or reset) within `wait`, discarding packets.
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        self.packets_until_closed(wait).await.is_some()
    }

    /// The packets weir sends before it closes the connection, or None when it is still open
    /// after `wait`.
    pub async fn packets_until_closed(&mut self, wait: Duration) -> Option<Vec<Packet>> {
        tokio::time::timeout(wait, async {
            let mut packets = Vec::new();
            while let Some(packet) = self.recv().await {
                packets.push(packet);
            }
            packets
        })
        .await
        .ok()
    }

    /// Expects an MQTT 5 DISCONNECT with `reason`, then the close; returns its reason string.
    pub async fn expect_disconnect(&mut self, reason: ReasonCode) -> String {
        let packet = self.recv_within(PROMPTLY).await.expect("an answer in time");
        let Some(Packet::DisconnectV5(DisconnectV5 { reason: got, properties })) = packet else {
            panic!("expected DISCONNECT {reason:?}, got {packet:?}");
        };
        assert_eq!(got, reason, "{properties:?}");
        assert_eq!(self.recv_within(PROMPTLY).await, Ok(None), "closed after the DISCONNECT");
        properties.reason_string.unwrap_or_default()
    }

    /// Says goodbye (MQTT 5: with `session_expiry`, replacing the CONNECT's) and waits for the
    /// close.
    pub async fn disconnect(mut self, session_expiry: Option<u32>) {
        let packet = if self.version.is_v5() {
            Packet::DisconnectV5(DisconnectV5 {
                reason: ReasonCode::Success,
                properties: Properties { session_expiry_interval: session_expiry, ..Properties::default() },
            })
        } else {
            Packet::Disconnect
        };
        self.send(&packet).await;
        assert_eq!(self.recv_within(PROMPTLY).await, Ok(None), "closed after DISCONNECT");
    }
}
