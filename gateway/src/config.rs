//! The one typed configuration tree, parsed from TOML and validated before any socket binds.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use weir_protocols::payload::PayloadFormat;

/// The documented default configuration, printed by `weir default-config`.
pub const DEFAULT_CONFIG: &str = include_str!("../weir.default.toml");

/// A configuration error with the place it came from. `weir check` prints it and exits 64.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read { path: String, source: std::io::Error },
    /// TOML syntax or type error; the message carries the line and column.
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    /// A value that parses but cannot work, named by its key path.
    #[error("{path}: {key}: {reason}")]
    Invalid { path: String, key: String, reason: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the SQLite file, disk buffers and the session table live.
    #[serde(default = "defaults::data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub ops: OpsConfig,
    /// Device-facing listeners. Omitted: one MQTT listener on 127.0.0.1:1883.
    #[serde(default = "defaults::listeners")]
    pub listeners: Vec<ListenerConfig>,
    /// MQTT persistent sessions, shared by every MQTT listener (also MQTT over WebSocket).
    #[serde(default)]
    pub sessions: SessionsConfig,
    /// What weir keeps about each device it hears from (`/api/devices`, the dashboard).
    #[serde(default)]
    pub sources: SourcesConfig,
    #[serde(default)]
    pub fabric: FabricConfig,
    #[serde(default)]
    pub sink: SinkConfig,
    /// A write-ahead log between the fabric and the sink. Omitted: none (acks follow the sink).
    #[serde(default)]
    pub buffer: Option<BufferConfig>,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpsConfig {
    /// `/metrics`, `/healthz`, `/readyz`. Port 0 picks a free port.
    #[serde(default = "defaults::ops_listen")]
    pub listen: SocketAddr,
    /// Serve the ops endpoints over TLS (with `client_ca_file`: only to holders of a client
    /// certificate from that CA). Omitted: plain HTTP.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

impl Default for OpsConfig {
    fn default() -> Self {
        Self { listen: defaults::ops_listen(), tls: None }
    }
}

/// `[listeners.tls]` / `[ops.tls]`: TLS (1.2 and 1.3, rustls) on a listener. Files are PEM; a
/// relative path is taken from the config file's directory. SIGHUP re-reads every file for new
/// handshakes; connections already open keep their session.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// The certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// CA certificates that client certificates must chain to. Set: mutual TLS, and a device's
    /// identity comes from its certificate (see `identity`).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// With `client_ca_file`: `required` (default; a client without a certificate fails the
    /// handshake) or `optional` (such a client connects without a certificate identity).
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
    /// Certificate revocation lists (PEM or DER) of the client CAs; a revoked client certificate
    /// fails the handshake. When given, every CA in a client's chain needs its CRL here.
    #[serde(default)]
    pub crl_files: Vec<PathBuf>,
    /// Where a client certificate's device identity comes from: `cn` (default), `san_dns`,
    /// `san_uri` or `san_email`. A certificate with none, with several, or with one containing
    /// an MQTT wildcard (`+`, `#`) or a control character fails the handshake.
    #[serde(default)]
    pub identity: Option<IdentitySource>,
    /// A connection that has not finished its TLS handshake this long after it was accepted is
    /// closed (counted as `weir_tls_handshake_failures_total{reason="timeout"}`).
    #[serde(default = "defaults::handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// Oldest TLS version accepted: `1.2` (default) or `1.3`. Older versions are never accepted.
    #[serde(default)]
    pub min_version: TlsVersion,
}

/// Whether a TLS client must present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    Required,
    Optional,
}

/// The part of a client certificate that names the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    /// The subject's Common Name.
    #[default]
    Cn,
    /// The DNS name in the Subject Alternative Name extension.
    SanDns,
    /// The URI in the Subject Alternative Name extension.
    SanUri,
    /// The email address (rfc822Name) in the Subject Alternative Name extension.
    SanEmail,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

/// `[listeners.auth]`: how a listener's devices prove who they are. The identity proven is the
/// device id of the connection (records that name none get it; a client id, URL or hello
/// naming another device is refused) and what ACL templates are filled with.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `password_file` (MQTT user name and password; HTTP Basic) or `jwt` (the token in the
    /// MQTT password field; HTTP `Authorization: Bearer`).
    pub kind: AuthKind,
    /// With `kind = "password_file"`: lines of `user:$argon2id$...` (`weir passwd add` writes
    /// them). Relative: from the config file's folder. Re-read on SIGHUP.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// With `kind = "jwt"`: how tokens are checked.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    /// Failed attempts one source address (IPv6: its /64) may make at once; beyond, attempts
    /// from it are refused without being checked (MQTT 5 CONNACK 0x97, 3.1.1 0x03) and counted
    /// in `weir_auth_rate_limited_total`.
    #[serde(default = "defaults::auth_max_failures")]
    pub max_failures: u32,
    /// Failed attempts an address gets back per minute (the refill of `max_failures`).
    #[serde(default = "defaults::auth_failures_per_minute")]
    pub failures_per_minute: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthKind {
    PasswordFile,
    Jwt,
}

/// `jwt = { ... }` of `[listeners.auth]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The one algorithm accepted (a token naming another, `none` included, is refused).
    pub algorithm: JwtAlgorithm,
    /// HS256: the shared secret (the file's bytes, one trailing newline aside; 32 bytes at
    /// least). RS256/ES256: the PEM public key. Relative: from the config file's folder.
    pub key_file: PathBuf,
    /// The claim holding the device id (a string).
    #[serde(default = "defaults::jwt_device_id_claim")]
    pub device_id_claim: String,
    /// Required `aud` (the token must name it), if set.
    #[serde(default)]
    pub audience: Option<String>,
    /// Required `iss`, if set.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds. `exp` is required; the connection
    /// closes at `exp` plus this (MQTT 5: DISCONNECT 0xA0).
    #[serde(default = "defaults::jwt_leeway_s")]
    pub leeway_s: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum JwtAlgorithm {
    #[serde(rename = "HS256")]
    Hs256,
    #[serde(rename = "RS256")]
    Rs256,
    #[serde(rename = "ES256")]
    Es256,
}

impl AuthConfig {
    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        };
        if let Some(file) = &mut self.password_file {
            resolve(file);
        }
        if let Some(jwt) = &mut self.jwt {
            resolve(&mut jwt.key_file);
        }
    }

    /// Checks the settings, then loads the password file or key as startup would.
    fn validate(&self) -> Result<(), (String, String)> {
        match (self.kind, &self.password_file, &self.jwt) {
            (AuthKind::PasswordFile, None, _) => {
                return Err(("password_file".into(), "kind = \"password_file\" needs password_file".into()))
            }
            (AuthKind::PasswordFile, _, Some(_)) => {
                return Err(("jwt".into(), "only for kind = \"jwt\"".into()))
            }
            (AuthKind::Jwt, _, None) => {
                return Err(("jwt".into(), "kind = \"jwt\" needs jwt = { algorithm, key_file }".into()))
            }
            (AuthKind::Jwt, Some(_), _) => {
                return Err(("password_file".into(), "only for kind = \"password_file\"".into()))
            }
            _ => {}
        }
        if self.max_failures == 0 {
            return Err(("max_failures".into(), "must be at least 1".into()));
        }
        if let Some(jwt) = &self.jwt {
            if jwt.device_id_claim.is_empty() {
                return Err(("jwt.device_id_claim".into(), "must name a claim".into()));
            }
        }
        let field = if self.kind == AuthKind::Jwt { "jwt.key_file" } else { "password_file" };
        crate::auth::Authenticator::load(self).map(drop).map_err(|reason| (field.into(), reason))
    }
}

impl TlsConfig {
    /// Makes relative file paths relative to `base` (the config file's directory).
    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        };
        resolve(&mut self.cert_file);
        resolve(&mut self.key_file);
        if let Some(ca) = &mut self.client_ca_file {
            resolve(ca);
        }
        self.crl_files.iter_mut().for_each(resolve);
    }

    /// Mutual TLS with `client_auth = "required"`: every device is authenticated by its
    /// certificate.
    pub fn requires_client_certificates(&self) -> bool {
        self.client_ca_file.is_some() && self.client_auth != Some(ClientAuth::Optional)
    }

    /// Checks the settings, then reads and parses every file as a reload would.
    fn validate(&self) -> Result<(), (String, String)> {
        if self.client_ca_file.is_none() {
            for (set, key) in [
                (self.client_auth.is_some(), "client_auth"),
                (!self.crl_files.is_empty(), "crl_files"),
                (self.identity.is_some(), "identity"),
            ] {
                if set {
                    return Err((key.into(), "needs client_ca_file (client certificates)".into()));
                }
            }
        }
        if !(1..=600_000).contains(&self.handshake_timeout_ms) {
            return Err(("handshake_timeout_ms".into(), "must be between 1 and 600000".into()));
        }
        crate::listener::tls::server_config(self)
            .map(drop)
            .map_err(|error| (error.field.into(), error.reason))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "protocol", rename_all = "snake_case")]
pub enum ListenerConfig {
    /// MQTT 3.1, 3.1.1 and 5 over TCP.
    Mqtt(MqttListenerConfig),
    /// HTTP: WebSocket ingest at `/ingest`, MQTT over WebSocket at `/mqtt`, `POST /ingest`.
    Ws(WsListenerConfig),
    /// Raw TCP with length-prefixed protobuf or NDJSON frames.
    Tcp(TcpListenerConfig),
    /// weir as a client of an existing MQTT broker, acking upstream after the commit.
    MqttBridge(BridgeConfig),
}

impl ListenerConfig {
    /// The address to bind; `None` for the bridge, which connects out instead.
    pub fn listen(&self) -> Option<SocketAddr> {
        match self {
            ListenerConfig::Mqtt(m) => Some(m.listen),
            ListenerConfig::Ws(w) => Some(w.listen),
            ListenerConfig::Tcp(t) => Some(t.listen),
            ListenerConfig::MqttBridge(_) => None,
        }
    }

    /// The protocol name, as in the config and in metric labels.
    pub fn protocol(&self) -> &'static str {
        match self {
            ListenerConfig::Mqtt(_) => "mqtt",
            ListenerConfig::Ws(_) => "ws",
            ListenerConfig::Tcp(_) => "tcp",
            ListenerConfig::MqttBridge(_) => "mqtt_bridge",
        }
    }

    /// The listener's TLS settings; `None` for plain TCP (and for the bridge, a client).
    pub fn tls(&self) -> Option<&TlsConfig> {
        match self {
            ListenerConfig::Mqtt(m) => m.tls.as_ref(),
            ListenerConfig::Ws(w) => w.tls.as_ref(),
            ListenerConfig::Tcp(t) => t.tls.as_ref(),
            ListenerConfig::MqttBridge(_) => None,
        }
    }

    /// The listener's device authentication, if any (tcp authenticates with client
    /// certificates only).
    pub fn auth(&self) -> Option<&AuthConfig> {
        match self {
            ListenerConfig::Mqtt(m) => m.auth.as_ref(),
            ListenerConfig::Ws(w) => w.auth.as_ref(),
            ListenerConfig::Tcp(_) | ListenerConfig::MqttBridge(_) => None,
        }
    }

    fn auth_mut(&mut self) -> Option<&mut AuthConfig> {
        match self {
            ListenerConfig::Mqtt(m) => m.auth.as_mut(),
            ListenerConfig::Ws(w) => w.auth.as_mut(),
            ListenerConfig::Tcp(_) | ListenerConfig::MqttBridge(_) => None,
        }
    }

    /// The listener's publish rules (MQTT topics).
    pub fn acl(&self) -> &[AclRule] {
        match self {
            ListenerConfig::Mqtt(m) => &m.acl,
            ListenerConfig::Ws(w) => &w.acl,
            ListenerConfig::Tcp(_) | ListenerConfig::MqttBridge(_) => &[],
        }
    }

    /// Per-connection messages and bytes per second; `None` for the bridge (it pulls).
    pub fn rates(&self) -> Option<(u32, u64)> {
        match self {
            ListenerConfig::Mqtt(m) => Some((m.max_messages_per_s, m.max_bytes_per_s)),
            ListenerConfig::Ws(w) => Some((w.max_messages_per_s, w.max_bytes_per_s)),
            ListenerConfig::Tcp(t) => Some((t.max_messages_per_s, t.max_bytes_per_s)),
            ListenerConfig::MqttBridge(_) => None,
        }
    }

    /// This listener with the settings a reload changes in place (rates, ACL rules) taken from
    /// `from` (a listener of the same protocol; otherwise this one unchanged).
    pub fn with_live_settings_of(&self, from: &ListenerConfig) -> ListenerConfig {
        self.with_rates_of(from).with_acl_of(from)
    }

    /// This listener with `from`'s message and byte rates.
    pub fn with_rates_of(&self, from: &ListenerConfig) -> ListenerConfig {
        let mut merged = self.clone();
        match (&mut merged, from) {
            (ListenerConfig::Mqtt(m), ListenerConfig::Mqtt(f)) => {
                (m.max_messages_per_s, m.max_bytes_per_s) = (f.max_messages_per_s, f.max_bytes_per_s);
            }
            (ListenerConfig::Ws(w), ListenerConfig::Ws(f)) => {
                (w.max_messages_per_s, w.max_bytes_per_s) = (f.max_messages_per_s, f.max_bytes_per_s);
            }
            (ListenerConfig::Tcp(t), ListenerConfig::Tcp(f)) => {
                (t.max_messages_per_s, t.max_bytes_per_s) = (f.max_messages_per_s, f.max_bytes_per_s);
            }
            _ => {}
        }
        merged
    }

    /// This listener with `from`'s publish rules.
    pub fn with_acl_of(&self, from: &ListenerConfig) -> ListenerConfig {
        let mut merged = self.clone();
        match (&mut merged, from) {
            (ListenerConfig::Mqtt(m), ListenerConfig::Mqtt(f)) => m.acl = f.acl.clone(),
            (ListenerConfig::Ws(w), ListenerConfig::Ws(f)) => w.acl = f.acl.clone(),
            _ => {}
        }
        merged
    }

    fn tls_mut(&mut self) -> Option<&mut TlsConfig> {
        match self {
            ListenerConfig::Mqtt(m) => m.tls.as_mut(),
            ListenerConfig::Ws(w) => w.tls.as_mut(),
            ListenerConfig::Tcp(t) => t.tls.as_mut(),
            ListenerConfig::MqttBridge(_) => None,
        }
    }

    /// When this listener's devices are acknowledged.
    pub fn ack(&self) -> AckPoint {
        match self {
            ListenerConfig::Mqtt(m) => m.ack,
            ListenerConfig::Ws(w) => w.ack,
            ListenerConfig::Tcp(t) => t.ack,
            ListenerConfig::MqttBridge(b) => b.ack,
        }
    }

    /// Admission limits at accept; `None` for the bridge, which accepts nothing.
    pub fn admission(&self) -> Option<AdmissionConfig> {
        let (max_connections_per_ip, max_connection_rate, connection_burst) = match self {
            ListenerConfig::Mqtt(m) => (m.max_connections_per_ip, m.max_connection_rate, m.connection_burst),
            ListenerConfig::Ws(w) => (w.max_connections_per_ip, w.max_connection_rate, w.connection_burst),
            ListenerConfig::Tcp(t) => (t.max_connections_per_ip, t.max_connection_rate, t.connection_burst),
            ListenerConfig::MqttBridge(_) => return None,
        };
        Some(AdmissionConfig { max_connections_per_ip, max_connection_rate, connection_burst })
    }

    /// The largest message this listener accepts (packet, WebSocket message or frame).
    pub fn max_message_bytes(&self) -> usize {
        match self {
            ListenerConfig::Mqtt(m) => m.max_packet_bytes,
            ListenerConfig::Ws(w) => w.max_message_bytes.max(w.max_packet_bytes),
            ListenerConfig::Tcp(t) => t.max_frame_bytes,
            ListenerConfig::MqttBridge(b) => b.max_packet_bytes,
        }
    }
}

/// Admission limits of one listener (see [`crate::listener::admission`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionConfig {
    pub max_connections_per_ip: usize,
    pub max_connection_rate: u32,
    pub connection_burst: u32,
}

/// When a device's message counts as acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckPoint {
    /// After the sink committed every record of the message (the default).
    Committed,
    /// After the disk buffer synced the message (needs `[buffer] kind = "disk"`).
    Buffered,
    /// As soon as the message is in the fabric: fastest, lost if weir dies before the commit.
    Received,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadConfig {
    Json,
    Protobuf,
    Auto,
}

impl From<PayloadConfig> for PayloadFormat {
    fn from(p: PayloadConfig) -> Self {
        match p {
            PayloadConfig::Json => PayloadFormat::Json,
            PayloadConfig::Protobuf => PayloadFormat::Protobuf,
            PayloadConfig::Auto => PayloadFormat::Auto,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttListenerConfig {
    #[serde(default = "defaults::mqtt_listen")]
    pub listen: SocketAddr,
    #[serde(default = "defaults::payload")]
    pub payload: PayloadConfig,
    #[serde(default = "defaults::ack")]
    pub ack: AckPoint,
    /// Largest MQTT packet accepted; a bigger one closes the connection before it is buffered
    /// (MQTT 5: after DISCONNECT 0x95). Advertised to MQTT 5 devices as Maximum Packet Size.
    #[serde(default = "defaults::max_packet_bytes")]
    pub max_packet_bytes: usize,
    /// QoS 1/2 messages per connection awaiting their ack. MQTT 3.1.1: at the bound weir stops
    /// reading. MQTT 5: advertised as Receive Maximum; weir keeps reading (and answering
    /// PINGREQ), and a device that sends more is disconnected with 0x93.
    #[serde(default = "defaults::max_inflight")]
    pub max_inflight: usize,
    /// MQTT 5 topic aliases a device may define (Topic Alias Maximum, 0 = none, at most 1024).
    /// An alias of 0 or above this is answered with DISCONNECT 0x94.
    #[serde(default = "defaults::max_topic_aliases")]
    pub max_topic_aliases: u16,
    /// MQTT 5 User Properties accepted in one packet (at most 1024); more closes the connection
    /// with DISCONNECT 0x97 (quota exceeded) before they are allocated.
    #[serde(default = "defaults::max_user_properties")]
    pub max_user_properties: usize,
    /// Longest keepalive, in seconds, a device gets: one asking for 0 (none) or more is held to
    /// this and disconnected after 1.5 times it of silence (MQTT 5 devices are told it as Server
    /// Keep Alive; 3.1.1 devices cannot be).
    #[serde(default = "defaults::max_keepalive_s")]
    pub max_keepalive_s: u16,
    /// Longest topic name accepted, in bytes; a longer one closes the connection (MQTT 5:
    /// DISCONNECT 0x90).
    #[serde(default = "defaults::max_topic_bytes")]
    pub max_topic_bytes: usize,
    /// Most levels in a topic name (`a/b/c` has 3); more closes the connection likewise.
    #[serde(default = "defaults::max_topic_levels")]
    pub max_topic_levels: usize,
    /// Messages per second one connection (one device) may send; beyond it (after a burst of
    /// one second's worth) weir stops reading it until it is back within its rate: the device
    /// is slowed, nothing is dropped. 0: no limit.
    #[serde(default = "defaults::max_messages_per_s")]
    pub max_messages_per_s: u32,
    /// Payload bytes per second one connection may send, paced the same way. 0: no limit.
    #[serde(default = "defaults::max_bytes_per_s")]
    pub max_bytes_per_s: u64,
    /// Open connections on this listener; at the bound weir stops accepting.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Connections from one source address; beyond it a new one is refused (0: no cap).
    #[serde(default = "defaults::max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// New connections per second this listener admits (a token bucket, 0: no limit); beyond
    /// it a connection is refused at once (MQTT 5: CONNACK 0x89 server busy).
    #[serde(default = "defaults::max_connection_rate")]
    pub max_connection_rate: u32,
    /// New connections admitted at once after a quiet spell (the bucket's size).
    #[serde(default = "defaults::connection_burst")]
    pub connection_burst: u32,
    /// Time a new connection has to send CONNECT before it is closed.
    #[serde(default = "defaults::connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Keep each message's raw payload in the record.
    #[serde(default)]
    pub keep_raw: bool,
    /// Accept devices without authentication on a non-loopback address.
    #[serde(default)]
    pub allow_anonymous: bool,
    /// MQTT over TLS (usually port 8883). Omitted: plain TCP.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Device authentication (user name and password, or JWT). Omitted: devices are anonymous
    /// (or identified by a client certificate).
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// Publish rules, `[{ publish = "devices/{device_id}/#" }, ...]`. With `auth` or any rule,
    /// a topic no rule allows is denied (MQTT 5: PUBACK/PUBREC 0x87; 3.1.1: the connection is
    /// closed). Omitted with no auth: every topic is allowed.
    #[serde(default)]
    pub acl: Vec<AclRule>,
}

/// One ACL rule: an MQTT topic filter (`+`, `#`) a device may publish to, whose levels may hold
/// `{device_id}`, `{client_id}` or `{username}`. All three are the connection's authenticated
/// identity (the client id must equal it), always matched as text, never as a wildcard.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    pub publish: String,
}

impl Default for MqttListenerConfig {
    fn default() -> Self {
        Self {
            listen: defaults::mqtt_listen(),
            payload: defaults::payload(),
            ack: defaults::ack(),
            max_packet_bytes: defaults::max_packet_bytes(),
            max_inflight: defaults::max_inflight(),
            max_topic_aliases: defaults::max_topic_aliases(),
            max_user_properties: defaults::max_user_properties(),
            max_keepalive_s: defaults::max_keepalive_s(),
            max_topic_bytes: defaults::max_topic_bytes(),
            max_topic_levels: defaults::max_topic_levels(),
            max_messages_per_s: defaults::max_messages_per_s(),
            max_bytes_per_s: defaults::max_bytes_per_s(),
            max_connections: defaults::max_connections(),
            max_connections_per_ip: defaults::max_connections_per_ip(),
            max_connection_rate: defaults::max_connection_rate(),
            connection_burst: defaults::connection_burst(),
            connect_timeout_ms: defaults::connect_timeout_ms(),
            keep_raw: false,
            allow_anonymous: false,
            tls: None,
            auth: None,
            acl: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WsListenerConfig {
    #[serde(default = "defaults::ws_listen")]
    pub listen: SocketAddr,
    /// Payload format of MQTT-over-WebSocket publishes (WebSocket ingest: text is JSON, binary
    /// is protobuf; HTTP: by Content-Type).
    #[serde(default = "defaults::payload")]
    pub payload: PayloadConfig,
    #[serde(default = "defaults::ack")]
    pub ack: AckPoint,
    /// Largest WebSocket message or HTTP body; a bigger one gets an error (413 for HTTP) and,
    /// on a WebSocket, a close with code 1009. Checked before the body is buffered.
    #[serde(default = "defaults::max_message_bytes")]
    pub max_message_bytes: usize,
    /// Largest single WebSocket frame (a message may span frames); never more than
    /// `max_message_bytes`. A bigger frame closes the connection with code 1009.
    #[serde(default = "defaults::max_frame_bytes")]
    pub max_frame_bytes: usize,
    /// Largest MQTT packet on `/mqtt`.
    #[serde(default = "defaults::max_packet_bytes")]
    pub max_packet_bytes: usize,
    /// Messages per connection awaiting their ack; at the bound weir stops reading.
    #[serde(default = "defaults::max_inflight")]
    pub max_inflight: usize,
    /// Messages per second one connection (one device) may send; beyond it (after a burst of
    /// one second's worth) weir stops reading it until it is back within its rate: the device
    /// is slowed, nothing is dropped. 0: no limit.
    #[serde(default = "defaults::max_messages_per_s")]
    pub max_messages_per_s: u32,
    /// Payload bytes per second one connection may send, paced the same way. 0: no limit.
    #[serde(default = "defaults::max_bytes_per_s")]
    pub max_bytes_per_s: u64,
    /// Open connections on this listener; at the bound weir stops accepting.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Connections from one source address; beyond it a new one is refused (0: no cap).
    #[serde(default = "defaults::max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// New connections per second this listener admits (a token bucket, 0: no limit); beyond
    /// it a connection is refused at once (MQTT 5: CONNACK 0x89 server busy).
    #[serde(default = "defaults::max_connection_rate")]
    pub max_connection_rate: u32,
    /// New connections admitted at once after a quiet spell (the bucket's size).
    #[serde(default = "defaults::connection_burst")]
    pub connection_burst: u32,
    /// Time a new connection has to finish its HTTP request (and, on `/mqtt`, send CONNECT).
    #[serde(default = "defaults::connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// A WebSocket ingest connection that sends nothing for this long is closed; 0 = never.
    #[serde(default = "defaults::idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Header naming the device on `/ingest` when the URL has no `?device=` parameter.
    #[serde(default = "defaults::device_id_header")]
    pub device_id_header: String,
    #[serde(default)]
    pub keep_raw: bool,
    #[serde(default)]
    pub allow_anonymous: bool,
    /// HTTPS and WSS (every path). Omitted: plain HTTP.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Device authentication on every path: `/mqtt` as an MQTT listener's; `/ingest` (WebSocket
    /// and POST) with `Authorization: Basic` (password file) or `Bearer` (JWT).
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// Publish rules of `/mqtt` (as an MQTT listener's `acl`). `/ingest` needs none: its device
    /// must be the authenticated identity.
    #[serde(default)]
    pub acl: Vec<AclRule>,
}

impl Default for WsListenerConfig {
    fn default() -> Self {
        Self {
            listen: defaults::ws_listen(),
            payload: defaults::payload(),
            ack: defaults::ack(),
            max_message_bytes: defaults::max_message_bytes(),
            max_frame_bytes: defaults::max_frame_bytes(),
            max_packet_bytes: defaults::max_packet_bytes(),
            max_inflight: defaults::max_inflight(),
            max_messages_per_s: defaults::max_messages_per_s(),
            max_bytes_per_s: defaults::max_bytes_per_s(),
            max_connections: defaults::max_connections(),
            max_connections_per_ip: defaults::max_connections_per_ip(),
            max_connection_rate: defaults::max_connection_rate(),
            connection_burst: defaults::connection_burst(),
            connect_timeout_ms: defaults::connect_timeout_ms(),
            idle_timeout_ms: defaults::idle_timeout_ms(),
            device_id_header: defaults::device_id_header(),
            keep_raw: false,
            allow_anonymous: false,
            tls: None,
            auth: None,
            acl: Vec::new(),
        }
    }
}

/// How a raw TCP stream is cut into messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TcpFraming {
    /// u32 big-endian length, then that many bytes of protobuf `weir.v1.DevicePayload`.
    LengthPrefixed,
    /// One JSON value per line (NDJSON).
    Lines,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpListenerConfig {
    #[serde(default = "defaults::tcp_listen")]
    pub listen: SocketAddr,
    #[serde(default = "defaults::framing")]
    pub framing: TcpFraming,
    #[serde(default = "defaults::ack")]
    pub ack: AckPoint,
    /// Largest frame (length prefix value, or line length); a bigger one gets an error frame
    /// and a close, checked before the frame is buffered.
    #[serde(default = "defaults::max_message_bytes")]
    pub max_frame_bytes: usize,
    /// Frames per connection awaiting their ack; at the bound weir stops reading.
    #[serde(default = "defaults::max_inflight")]
    pub max_inflight: usize,
    /// Messages per second one connection (one device) may send; beyond it (after a burst of
    /// one second's worth) weir stops reading it until it is back within its rate: the device
    /// is slowed, nothing is dropped. 0: no limit.
    #[serde(default = "defaults::max_messages_per_s")]
    pub max_messages_per_s: u32,
    /// Payload bytes per second one connection may send, paced the same way. 0: no limit.
    #[serde(default = "defaults::max_bytes_per_s")]
    pub max_bytes_per_s: u64,
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    #[serde(default = "defaults::max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    #[serde(default = "defaults::max_connection_rate")]
    pub max_connection_rate: u32,
    #[serde(default = "defaults::connection_burst")]
    pub connection_burst: u32,
    /// Time a new connection has to send its first frame.
    #[serde(default = "defaults::connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// A connection that sends nothing for this long is closed; 0 = never.
    #[serde(default = "defaults::idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    #[serde(default)]
    pub keep_raw: bool,
    #[serde(default)]
    pub allow_anonymous: bool,
    /// Frames over TLS. Omitted: plain TCP.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

impl Default for TcpListenerConfig {
    fn default() -> Self {
        Self {
            listen: defaults::tcp_listen(),
            framing: defaults::framing(),
            ack: defaults::ack(),
            max_frame_bytes: defaults::max_message_bytes(),
            max_inflight: defaults::max_inflight(),
            max_messages_per_s: defaults::max_messages_per_s(),
            max_bytes_per_s: defaults::max_bytes_per_s(),
            max_connections: defaults::max_connections(),
            max_connections_per_ip: defaults::max_connections_per_ip(),
            max_connection_rate: defaults::max_connection_rate(),
            connection_burst: defaults::connection_burst(),
            connect_timeout_ms: defaults::connect_timeout_ms(),
            idle_timeout_ms: defaults::idle_timeout_ms(),
            keep_raw: false,
            allow_anonymous: false,
            tls: None,
        }
    }
}

/// `protocol = "mqtt_bridge"`: weir subscribes to an existing broker with a persistent session
/// and QoS 1, and acks each message upstream only after its commit.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// The upstream broker, `host:port`.
    pub broker: String,
    /// Client id at the broker; the persistent session is keyed by it, keep it stable.
    #[serde(default = "defaults::bridge_client_id")]
    pub client_id: String,
    /// Topic filters subscribed with QoS 1.
    pub filters: Vec<String>,
    /// User name at the broker, if it wants one.
    #[serde(default)]
    pub username: Option<String>,
    /// Password at the broker; needs `username` (MQTT 3.1.1 has no password without a user).
    #[serde(default)]
    pub password: Option<String>,
    /// How payloads are decoded: json | protobuf | auto.
    #[serde(default = "defaults::payload")]
    pub payload: PayloadConfig,
    /// `committed` (default): acked upstream after the sink commit. `received`: on enqueue.
    #[serde(default = "defaults::ack")]
    pub ack: AckPoint,
    /// Topic level (0-based) holding the device id when the payload names none; without it,
    /// the whole topic is the device id.
    #[serde(default)]
    pub device_id_topic_level: Option<usize>,
    /// Messages received from the broker and not yet acked upstream; at the bound weir stops
    /// reading from the broker (which holds the rest).
    #[serde(default = "defaults::bridge_max_inflight")]
    pub max_inflight: usize,
    /// Largest packet accepted from the broker; a bigger message is dead-lettered without its
    /// payload (never buffered) and acked, so it is not redelivered forever.
    #[serde(default = "defaults::max_packet_bytes")]
    pub max_packet_bytes: usize,
    /// MQTT keepalive toward the broker, in seconds (1..=65535).
    #[serde(default = "defaults::bridge_keepalive_s")]
    pub keepalive_s: u64,
    /// Reconnect backoff: starts here, doubles per failure (with jitter) up to the maximum.
    #[serde(default = "defaults::reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    #[serde(default = "defaults::reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// Keep each raw payload in the record.
    #[serde(default)]
    pub keep_raw: bool,
}

/// `[sessions]`: MQTT persistent sessions (3.1.1 Clean Session 0, MQTT 5 Session Expiry
/// Interval > 0), recorded in `data_dir/sessions.db` so that a device reconnecting after a
/// restart gets Session Present = 1 and resends what was not acknowledged.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionsConfig {
    /// Longest Session Expiry Interval granted, in seconds; a longer one (or "never", 2^32-1)
    /// is capped and the MQTT 5 device told so in CONNACK. 3.1.1 persistent sessions have no
    /// expiry of their own and get this one.
    pub max_expiry_s: u32,
    /// Stored sessions at most. Beyond it a CONNECT that would create another is refused
    /// (MQTT 5 CONNACK 0x97 quota exceeded, 3.1.1 0x03 server unavailable) and counted;
    /// existing sessions still resume and clean sessions still connect. 0 turns persistence
    /// off: no sessions.db, every CONNACK says Session Present = 0 (MQTT 5: expiry 0 granted).
    pub max_sessions: u64,
    /// How often expired sessions are removed (they are also removed at startup and, one by
    /// one, when their client id connects again).
    pub sweep_interval_ms: u64,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        Self { max_expiry_s: 7 * 24 * 3600, max_sessions: 100_000, sweep_interval_ms: 60_000 }
    }
}

/// Source awareness: the per-device table behind `/api/devices`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SourcesConfig {
    /// Devices tracked at most (about 400 bytes each); when full, the least recently seen are
    /// dropped from the table (counted in weir_devices_evicted_total). 0 turns tracking off.
    pub max_devices: usize,
    /// A device is "silent" once it has sent nothing for this long and for five of its usual
    /// intervals between messages.
    pub silence_min_s: u64,
    /// A device whose clock differs from weir's (receive time minus its timestamp, smoothed) by
    /// more than this is flagged "skewed".
    pub clock_skew_warn_ms: u64,
}

impl Default for SourcesConfig {
    fn default() -> Self {
        Self { max_devices: 100_000, silence_min_s: 60, clock_skew_warn_ms: 300_000 }
    }
}

/// What a sender meets when its shard is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Wait: the connection stops reading and the device's writes block.
    Block,
    /// Drop the new record, count it by reason, and answer the device.
    DropNewest,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FabricConfig {
    /// Number of shards; 0 = one per core. A device always maps to the same shard.
    #[serde(default)]
    pub shards: usize,
    /// Records per shard between enqueue and commit (queued, batching or being written).
    #[serde(default = "defaults::max_records")]
    pub max_records: usize,
    /// Record bytes per shard between enqueue and commit.
    #[serde(default = "defaults::max_bytes")]
    pub max_bytes: usize,
    /// A batch closes this long after its first record, if not full before.
    #[serde(default = "defaults::linger_ms")]
    pub linger_ms: u64,
    #[serde(default = "defaults::when_full")]
    pub when_full: WhenFull,
    /// A batch closes at this many records.
    #[serde(default = "defaults::batch_max_records")]
    pub batch_max_records: usize,
    /// A batch closes at this many bytes.
    #[serde(default = "defaults::batch_max_bytes")]
    pub batch_max_bytes: usize,
}

impl Default for FabricConfig {
    fn default() -> Self {
        Self {
            shards: 0,
            max_records: defaults::max_records(),
            max_bytes: defaults::max_bytes(),
            linger_ms: defaults::linger_ms(),
            when_full: defaults::when_full(),
            batch_max_records: defaults::batch_max_records(),
            batch_max_bytes: defaults::batch_max_bytes(),
        }
    }
}

impl FabricConfig {
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SinkConfig {
    Sqlite(SqliteSinkConfig),
    Kafka(KafkaSinkConfig),
    Postgres(PostgresSinkConfig),
    /// Discards records after counting them: measures the ingest path alone.
    Blackhole {},
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig::Sqlite(SqliteSinkConfig::default())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSinkConfig {
    /// `postgres://user:password@host:port/database` (or libpq `key=value` form).
    pub url: String,
    /// Table for records, created if missing; `schema.table` allowed.
    #[serde(default = "defaults::pg_table")]
    pub table: String,
    /// Table for undecodable payloads and rows the database rejects, created if missing.
    #[serde(default = "defaults::pg_dead_letter_table")]
    pub dead_letter_table: String,
    /// Connections, and so batches written at once.
    #[serde(default = "defaults::pg_pool_size")]
    pub pool_size: usize,
    /// A connection attempt taking longer fails (and is retried with backoff).
    #[serde(default = "defaults::pg_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// With `sslmode=require` in the URL, weir connects over TLS and verifies the server's
    /// certificate and host name against this PEM bundle (default: the system's roots).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
}

/// How record values are encoded on Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KafkaEncoding {
    /// `weir.v1.Record` (proto/schemas/weir.proto).
    Protobuf,
    /// A JSON object with the record's fields.
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KafkaCompression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl KafkaCompression {
    pub fn as_str(self) -> &'static str {
        match self {
            KafkaCompression::None => "none",
            KafkaCompression::Gzip => "gzip",
            KafkaCompression::Snappy => "snappy",
            KafkaCompression::Lz4 => "lz4",
            KafkaCompression::Zstd => "zstd",
        }
    }
}

/// A librdkafka option value; TOML strings, integers, floats and booleans are all accepted.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum OptionValue {
    Text(String),
    Integer(i64),
    Float(f64),
    Flag(bool),
}

impl std::fmt::Display for OptionValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OptionValue::Text(s) => f.write_str(s),
            OptionValue::Integer(i) => write!(f, "{i}"),
            OptionValue::Float(x) => write!(f, "{x}"),
            OptionValue::Flag(b) => write!(f, "{b}"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// Bootstrap brokers, comma-separated `host:port`.
    pub brokers: String,
    /// Topic for records: a template where `{topic}` is the source topic with `/` mapped to `.`
    /// and characters Kafka does not allow replaced by `_`; without `{topic}`, a fixed topic.
    #[serde(default = "defaults::kafka_topic")]
    pub topic: String,
    #[serde(default = "defaults::kafka_encoding")]
    pub encoding: KafkaEncoding,
    /// Undecodable payloads and records Kafka refuses for good go here, with the reason.
    #[serde(default = "defaults::dead_letter_topic")]
    pub dead_letter_topic: String,
    /// Create missing topics (with the partitions and replication below). Off: records for a
    /// missing topic go to the dead-letter topic (which must exist).
    #[serde(default = "defaults::yes")]
    pub create_topics: bool,
    #[serde(default = "defaults::topic_partitions")]
    pub topic_partitions: i32,
    #[serde(default = "defaults::topic_replication_factor")]
    pub topic_replication_factor: i32,
    #[serde(default = "defaults::compression")]
    pub compression: KafkaCompression,
    /// librdkafka waits this long to fill a produce request (`linger.ms`).
    #[serde(default = "defaults::kafka_linger_ms")]
    pub linger_ms: u64,
    /// Largest produce request per partition (`batch.size`).
    #[serde(default = "defaults::kafka_batch_max_bytes")]
    pub batch_max_bytes: usize,
    /// Fabric batches produced concurrently; per-partition order holds across them.
    #[serde(default = "defaults::kafka_max_in_flight_batches")]
    pub max_in_flight_batches: usize,
    /// Messages librdkafka may hold unacknowledged (`queue.buffering.max.messages`). When the
    /// queue is full the sink waits (backpressure), it never fails a record for it.
    #[serde(default = "defaults::kafka_queue_max_messages")]
    pub queue_max_messages: usize,
    /// Further librdkafka producer properties. Those that would break weir's guarantees
    /// (idempotence off, acks other than all, delivery reports off) are rejected, and those
    /// with a typed field above must be set there.
    #[serde(default)]
    pub librdkafka_options: std::collections::BTreeMap<String, OptionValue>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SqliteSync {
    /// fsync on every commit: an acked record survives power loss.
    Full,
    /// fsync at checkpoints only: an acked record survives a crash of weir, not of the machine.
    Normal,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqliteSinkConfig {
    /// Database file, relative to `data_dir`.
    #[serde(default = "defaults::sqlite_path")]
    pub path: PathBuf,
    #[serde(default = "defaults::sqlite_sync")]
    pub synchronous: SqliteSync,
}

impl Default for SqliteSinkConfig {
    fn default() -> Self {
        Self { path: defaults::sqlite_path(), synchronous: defaults::sqlite_sync() }
    }
}

/// `[buffer]`: the disk buffer, a segmented write-ahead log in front of the sink. Batches are
/// appended and fsynced before the sink sees them; the sink reads them back, so an outage
/// fills the disk, not memory, and a restart replays what the sink had not committed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    pub kind: BufferKind,
    /// The log's directory, relative to `data_dir`.
    #[serde(default = "defaults::buffer_dir")]
    pub dir: PathBuf,
    /// Bytes the log may take on disk; when reached, devices wait (backpressure), nothing drops.
    #[serde(default = "defaults::buffer_max_bytes")]
    pub max_bytes: u64,
    /// One segment file; space is freed a whole segment at a time. Also bounds one record.
    #[serde(default = "defaults::buffer_segment_bytes")]
    pub segment_bytes: u64,
    #[serde(default = "defaults::buffer_fsync")]
    pub fsync: FsyncPolicy,
    /// With `fsync = "interval"`: the longest a written batch waits for its fsync.
    #[serde(default = "defaults::buffer_fsync_interval_ms")]
    pub fsync_interval_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BufferKind {
    Disk,
}

/// When the disk buffer fsyncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// After every group of batches written together (`ack = "buffered"` acks follow it).
    Batch,
    /// Every `fsync_interval_ms`: fewer fsyncs; buffered acks wait for the next one.
    Interval,
}

impl BufferConfig {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.segment_bytes < 64 * 1024 || self.segment_bytes > u64::from(u32::MAX) {
            return Err(("segment_bytes", format!("must be between 65536 and {}", u32::MAX)));
        }
        if self.max_bytes < 2 * self.segment_bytes {
            return Err((
                "max_bytes",
                format!(
                    "{} is less than two segments ({}): space is freed a segment at a time",
                    self.max_bytes,
                    2 * self.segment_bytes
                ),
            ));
        }
        if self.fsync == FsyncPolicy::Interval && !(1..=60_000).contains(&self.fsync_interval_ms) {
            return Err(("fsync_interval_ms", "must be between 1 and 60000".into()));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// After SIGTERM, time to flush batches and send the last acks before weir exits anyway.
    #[serde(default = "defaults::grace_ms")]
    pub grace_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { grace_ms: defaults::grace_ms() }
    }
}

mod defaults {
    use super::*;

    pub fn data_dir() -> PathBuf {
        "./weir-data".into()
    }
    pub fn ops_listen() -> SocketAddr {
        ([127, 0, 0, 1], 9100).into()
    }
    pub fn mqtt_listen() -> SocketAddr {
        ([127, 0, 0, 1], 1883).into()
    }
    pub fn ws_listen() -> SocketAddr {
        ([127, 0, 0, 1], 8080).into()
    }
    pub fn tcp_listen() -> SocketAddr {
        ([127, 0, 0, 1], 7000).into()
    }
    pub fn framing() -> TcpFraming {
        TcpFraming::LengthPrefixed
    }
    pub fn max_message_bytes() -> usize {
        256 << 10
    }
    pub fn max_frame_bytes() -> usize {
        64 << 10
    }
    pub fn idle_timeout_ms() -> u64 {
        300_000
    }
    pub fn device_id_header() -> String {
        "x-device-id".into()
    }
    pub fn bridge_client_id() -> String {
        "weir-bridge".into()
    }
    pub fn bridge_max_inflight() -> usize {
        1000
    }
    pub fn bridge_keepalive_s() -> u64 {
        30
    }
    pub fn reconnect_min_ms() -> u64 {
        100
    }
    pub fn reconnect_max_ms() -> u64 {
        30_000
    }
    pub fn listeners() -> Vec<ListenerConfig> {
        vec![ListenerConfig::Mqtt(MqttListenerConfig::default())]
    }
    pub fn payload() -> PayloadConfig {
        PayloadConfig::Auto
    }
    pub fn ack() -> AckPoint {
        AckPoint::Committed
    }
    pub fn max_packet_bytes() -> usize {
        1 << 20
    }
    pub fn max_inflight() -> usize {
        1024
    }
    pub fn max_topic_aliases() -> u16 {
        16
    }
    pub fn max_user_properties() -> usize {
        32
    }
    pub fn max_keepalive_s() -> u16 {
        600
    }
    pub fn max_topic_bytes() -> usize {
        1024
    }
    pub fn max_topic_levels() -> usize {
        32
    }
    pub fn max_messages_per_s() -> u32 {
        10_000
    }
    pub fn max_bytes_per_s() -> u64 {
        16 << 20
    }
    pub fn max_connections_per_ip() -> usize {
        1000
    }
    pub fn max_connection_rate() -> u32 {
        1000
    }
    pub fn connection_burst() -> u32 {
        2000
    }
    pub fn max_connections() -> usize {
        10_000
    }
    pub fn connect_timeout_ms() -> u64 {
        10_000
    }
    pub fn auth_max_failures() -> u32 {
        10
    }
    pub fn auth_failures_per_minute() -> u32 {
        10
    }
    pub fn jwt_device_id_claim() -> String {
        "sub".into()
    }
    pub fn jwt_leeway_s() -> u64 {
        30
    }
    pub fn handshake_timeout_ms() -> u64 {
        10_000
    }
    pub fn max_records() -> usize {
        65_536
    }
    pub fn max_bytes() -> usize {
        64 << 20
    }
    pub fn linger_ms() -> u64 {
        5
    }
    pub fn when_full() -> WhenFull {
        WhenFull::Block
    }
    pub fn batch_max_records() -> usize {
        4096
    }
    pub fn batch_max_bytes() -> usize {
        4 << 20
    }
    pub fn buffer_dir() -> PathBuf {
        "buffer".into()
    }
    pub fn buffer_max_bytes() -> u64 {
        1 << 30
    }
    pub fn buffer_segment_bytes() -> u64 {
        64 << 20
    }
    pub fn buffer_fsync() -> FsyncPolicy {
        FsyncPolicy::Batch
    }
    pub fn buffer_fsync_interval_ms() -> u64 {
        100
    }
    pub fn sqlite_path() -> PathBuf {
        "telemetry.db".into()
    }
    pub fn sqlite_sync() -> SqliteSync {
        SqliteSync::Full
    }
    pub fn grace_ms() -> u64 {
        10_000
    }
    pub fn pg_table() -> String {
        "telemetry".into()
    }
    pub fn pg_dead_letter_table() -> String {
        "telemetry_dead_letter".into()
    }
    pub fn pg_pool_size() -> usize {
        4
    }
    pub fn pg_connect_timeout_ms() -> u64 {
        10_000
    }
    pub fn yes() -> bool {
        true
    }
    pub fn kafka_topic() -> String {
        "telemetry.{topic}".into()
    }
    pub fn kafka_encoding() -> KafkaEncoding {
        KafkaEncoding::Protobuf
    }
    pub fn dead_letter_topic() -> String {
        "weir.dead-letter".into()
    }
    pub fn topic_partitions() -> i32 {
        6
    }
    pub fn topic_replication_factor() -> i32 {
        1
    }
    pub fn compression() -> KafkaCompression {
        KafkaCompression::Lz4
    }
    pub fn kafka_linger_ms() -> u64 {
        5
    }
    pub fn kafka_batch_max_bytes() -> usize {
        1 << 20
    }
    pub fn kafka_max_in_flight_batches() -> usize {
        4
    }
    pub fn kafka_queue_max_messages() -> usize {
        100_000
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: defaults::data_dir(),
            ops: OpsConfig::default(),
            listeners: defaults::listeners(),
            sessions: SessionsConfig::default(),
            sources: SourcesConfig::default(),
            fabric: FabricConfig::default(),
            sink: SinkConfig::default(),
            buffer: None,
            shutdown: ShutdownConfig::default(),
        }
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: shown.clone(), source })?;
        let base = path.parent().unwrap_or(Path::new(""));
        Self::parse_in(&text, &shown, base)
    }

    /// Parses and validates TOML text; `origin` names it in errors. Relative TLS file paths are
    /// taken from the working directory.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        Self::parse_in(text, origin, Path::new(""))
    }

    /// [`Config::parse`], taking relative TLS file paths from `base` (the config file's folder).
    pub fn parse_in(text: &str, origin: &str, base: &Path) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        config.listeners.iter_mut().filter_map(ListenerConfig::tls_mut).for_each(|t| t.resolve_paths(base));
        config.listeners.iter_mut().filter_map(ListenerConfig::auth_mut).for_each(|a| a.resolve_paths(base));
        if let Some(tls) = &mut config.ops.tls {
            tls.resolve_paths(base);
        }
        config.validate(origin)?;
        Ok(config)
    }

    /// Checks what types cannot: bounds that fit together, unique addresses, safe exposure.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid =
            |key: String, reason: String| ConfigError::Invalid { path: origin.to_owned(), key, reason };
        if self.listeners.is_empty() {
            return Err(invalid("listeners".into(), "at least one listener is needed".into()));
        }
        let f = &self.fabric;
        for (key, value) in [
            ("fabric.max_records", f.max_records),
            ("fabric.max_bytes", f.max_bytes),
            ("fabric.batch_max_records", f.batch_max_records),
            ("fabric.batch_max_bytes", f.batch_max_bytes),
        ] {
            if value == 0 {
                return Err(invalid(key.into(), "must be greater than 0".into()));
            }
        }
        if self.sessions.max_expiry_s == 0 {
            return Err(invalid(
                "sessions.max_expiry_s".into(),
                "must be greater than 0 (max_sessions = 0 turns persistent sessions off)".into(),
            ));
        }
        if self.sessions.sweep_interval_ms < 10 {
            return Err(invalid("sessions.sweep_interval_ms".into(), "must be at least 10".into()));
        }
        if f.batch_max_records > f.max_records {
            return Err(invalid(
                "fabric.batch_max_records".into(),
                format!("{} is more than fabric.max_records ({})", f.batch_max_records, f.max_records),
            ));
        }
        if let SinkConfig::Kafka(kafka) = &self.sink {
            let committed = self.listeners.iter().any(|l| l.ack() == AckPoint::Committed);
            kafka.validate(committed).map_err(|(key, reason)| invalid(format!("sink.{key}"), reason))?;
        }
        if let SinkConfig::Postgres(pg) = &self.sink {
            pg.validate().map_err(|(key, reason)| invalid(format!("sink.{key}"), reason))?;
        }
        if let Some(buffer) = &self.buffer {
            buffer.validate().map_err(|(key, reason)| invalid(format!("buffer.{key}"), reason))?;
            // A record is at most about its message decoded plus the raw bytes when they are
            // kept; one that still does not fit a segment is refused (counted, not acked).
            let largest = self.listeners.iter().map(ListenerConfig::max_message_bytes).max().unwrap_or(0);
            let needed = 2 * largest as u64 + 4096;
            if needed > buffer.segment_bytes {
                return Err(invalid(
                    "buffer.segment_bytes".into(),
                    format!(
                        "{} is too small for the {largest}-byte messages a listener accepts \
                         (a record must fit in one segment: at least {needed})",
                        buffer.segment_bytes
                    ),
                ));
            }
        }
        if let Some(tls) = &self.ops.tls {
            tls.validate().map_err(|(key, reason)| invalid(format!("ops.tls.{key}"), reason))?;
        }
        let mut seen = HashSet::new();
        for (i, listener) in self.listeners.iter().enumerate() {
            let key = |field: &str| format!("listeners[{i}].{field}");
            if let Some(tls) = listener.tls() {
                tls.validate().map_err(|(field, reason)| invalid(key(&format!("tls.{field}")), reason))?;
            }
            if listener.ack() == AckPoint::Buffered && self.buffer.is_none() {
                return Err(invalid(
                    key("ack"),
                    "\"buffered\" acks after the disk buffer's fsync, and there is no [buffer]; \
                     add [buffer] kind = \"disk\", or use \"committed\" or \"received\""
                        .into(),
                ));
            }
            if let Some(addr) = listener.listen() {
                if addr.port() != 0 && !seen.insert(addr) {
                    return Err(invalid(key("listen"), format!("{addr} is used by another listener")));
                }
            }
            let check = |field: &str, value: usize, min: usize, max: usize| {
                if value < min || value > max {
                    Err(invalid(key(field), format!("must be between {min} and {max}")))
                } else {
                    Ok(())
                }
            };
            let fits_fabric = |field: &str, value: usize| {
                if value > f.max_bytes {
                    Err(invalid(
                        key(field),
                        format!(
                            "{value} is more than fabric.max_bytes ({}): such a message could never be enqueued",
                            f.max_bytes
                        ),
                    ))
                } else {
                    Ok(())
                }
            };
            if let Some(auth) = listener.auth() {
                auth.validate().map_err(|(field, reason)| invalid(key(&format!("auth.{field}")), reason))?;
            }
            for (j, rule) in listener.acl().iter().enumerate() {
                if let Err(reason) = crate::auth::acl::TopicRule::parse(&rule.publish) {
                    return Err(invalid(
                        key(&format!("acl[{j}].publish")),
                        format!("{:?}: {reason}", rule.publish),
                    ));
                }
            }
            if matches!(listener, ListenerConfig::Mqtt(_))
                && listener.auth().is_some()
                && listener.acl().is_empty()
            {
                return Err(invalid(
                    key("acl"),
                    "with auth, publishing is denied unless a rule allows it, and there is no rule; \
                     add e.g. acl = [{ publish = \"devices/{device_id}/#\" }]"
                        .into(),
                ));
            }
            // Required client certificates, or an auth provider, authenticate every device.
            let authenticated = listener.tls().is_some_and(TlsConfig::requires_client_certificates)
                || listener.auth().is_some();
            let exposed = |addr: SocketAddr, allow_anonymous: bool| {
                if !addr.ip().is_loopback() && !allow_anonymous && !authenticated {
                    Err(invalid(
                        key("listen"),
                        format!(
                            "{addr} is not a loopback address and no authentication is configured; \
                             configure [listeners.auth] (a password file or JWT), require client \
                             certificates ([listeners.tls] client_ca_file), or set \
                             allow_anonymous = true on this listener to accept anonymous devices"
                        ),
                    ))
                } else {
                    Ok(())
                }
            };
            match listener {
                ListenerConfig::Mqtt(m) => {
                    exposed(m.listen, m.allow_anonymous)?;
                    check("max_packet_bytes", m.max_packet_bytes, 64, 256 << 20)?;
                    fits_fabric("max_packet_bytes", m.max_packet_bytes)?;
                    check("max_inflight", m.max_inflight, 1, 65_535)?;
                    check("max_topic_aliases", m.max_topic_aliases.into(), 0, 1024)?;
                    check("max_user_properties", m.max_user_properties, 0, 1024)?;
                    check("max_keepalive_s", m.max_keepalive_s.into(), 1, 65_535)?;
                    check("max_topic_bytes", m.max_topic_bytes, 1, 65_535)?;
                    check("max_topic_levels", m.max_topic_levels, 1, 65_535)?;
                    check("max_connections", m.max_connections, 1, usize::MAX)?;
                }
                ListenerConfig::Ws(w) => {
                    exposed(w.listen, w.allow_anonymous)?;
                    check("max_message_bytes", w.max_message_bytes, 64, 256 << 20)?;
                    check("max_frame_bytes", w.max_frame_bytes, 64, 256 << 20)?;
                    check("max_packet_bytes", w.max_packet_bytes, 64, 256 << 20)?;
                    fits_fabric("max_message_bytes", w.max_message_bytes)?;
                    fits_fabric("max_packet_bytes", w.max_packet_bytes)?;
                    check("max_inflight", w.max_inflight, 1, 65_535)?;
                    check("max_connections", w.max_connections, 1, usize::MAX)?;
                    if w.device_id_header.parse::<hyper::header::HeaderName>().is_err() {
                        return Err(invalid(key("device_id_header"), "not a valid HTTP header name".into()));
                    }
                }
                ListenerConfig::Tcp(t) => {
                    exposed(t.listen, t.allow_anonymous)?;
                    check("max_frame_bytes", t.max_frame_bytes, 64, 256 << 20)?;
                    fits_fabric("max_frame_bytes", t.max_frame_bytes)?;
                    check("max_inflight", t.max_inflight, 1, 65_535)?;
                    check("max_connections", t.max_connections, 1, usize::MAX)?;
                }
                ListenerConfig::MqttBridge(b) => {
                    if b.broker.rsplit_once(':').and_then(|(_, port)| port.parse::<u16>().ok()).is_none() {
                        return Err(invalid(key("broker"), format!("{:?} is not host:port", b.broker)));
                    }
                    if b.filters.is_empty() {
                        return Err(invalid(key("filters"), "at least one topic filter is needed".into()));
                    }
                    if b.client_id.is_empty() {
                        return Err(invalid(
                            key("client_id"),
                            "a persistent session needs a stable, non-empty client id".into(),
                        ));
                    }
                    check("max_inflight", b.max_inflight, 1, 65_535)?;
                    check("max_packet_bytes", b.max_packet_bytes, 64, 256 << 20)?;
                    check("keepalive_s", b.keepalive_s as usize, 1, 65_535)?;
                    if b.password.is_some() && b.username.is_none() {
                        return Err(invalid(
                            key("password"),
                            "a password needs a username (MQTT 3.1.1)".into(),
                        ));
                    }
                    fits_fabric("max_packet_bytes", b.max_packet_bytes)?;
                    if b.reconnect_min_ms == 0 || b.reconnect_min_ms > b.reconnect_max_ms {
                        return Err(invalid(
                            key("reconnect_min_ms"),
                            "must be greater than 0 and at most reconnect_max_ms".into(),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

impl PostgresSinkConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        if let Err(e) = self.url.parse::<tokio_postgres::Config>() {
            return Err(("url".into(), format!("not a PostgreSQL connection string: {e}")));
        }
        for (key, name) in [("table", &self.table), ("dead_letter_table", &self.dead_letter_table)] {
            if let Err(reason) = crate::sink::postgres::check_table_name(name) {
                return Err((key.into(), format!("{name:?}: {reason}")));
            }
        }
        if self.table == self.dead_letter_table {
            return Err(("dead_letter_table".into(), "must differ from table".into()));
        }
        if self.pool_size == 0 || self.pool_size > 64 {
            return Err(("pool_size".into(), "must be between 1 and 64".into()));
        }
        Ok(())
    }
}

impl KafkaSinkConfig {
    /// Checks topics and options; `committed` says whether some listener acks after commit.
    fn validate(&self, committed: bool) -> Result<(), (String, String)> {
        let err = |key: &str, reason: String| Err((key.to_owned(), reason));
        if self.brokers.trim().is_empty() {
            return err("brokers", "must name at least one broker (host:port)".into());
        }
        let fixed = self.topic.replace("{topic}", "x");
        if fixed.contains(['{', '}']) {
            return err("topic", format!("{:?}: the only placeholder is {{topic}}", self.topic));
        }
        if let Err(reason) = crate::sink::kafka::check_topic_name(&fixed) {
            return err("topic", format!("{:?}: {reason}", self.topic));
        }
        if let Err(reason) = crate::sink::kafka::check_topic_name(&self.dead_letter_topic) {
            return err("dead_letter_topic", format!("{:?}: {reason}", self.dead_letter_topic));
        }
        if self.topic_partitions < 1 || self.topic_replication_factor < 1 {
            return err("topic_partitions", "partitions and replication factor must be at least 1".into());
        }
        if self.max_in_flight_batches == 0 {
            return err("max_in_flight_batches", "must be at least 1".into());
        }
        if !(1..=10_000_000).contains(&self.queue_max_messages) {
            return err("queue_max_messages", "must be between 1 and 10000000".into());
        }
        for (name, value) in &self.librdkafka_options {
            let key = format!("librdkafka_options.\"{name}\"");
            let value = value.to_string();
            let typed = match name.as_str() {
                "bootstrap.servers" | "metadata.broker.list" => Some("brokers"),
                "compression.type" | "compression.codec" => Some("compression"),
                "linger.ms" | "queue.buffering.max.ms" => Some("linger_ms"),
                "batch.size" => Some("batch_max_bytes"),
                "queue.buffering.max.messages" => Some("queue_max_messages"),
                _ => None,
            };
            if let Some(field) = typed {
                return err(&key, format!("set it with the typed field `{field}` instead"));
            }
            match name.as_str() {
                "enable.idempotence" if value != "true" && committed => {
                    return err(
                        &key,
                        "weir acks devices after Kafka acknowledged their records (ack = \"committed\"); \
                         without the idempotent producer, retries can duplicate and reorder them. \
                         Remove this option, or use ack = \"received\" on every listener"
                            .into(),
                    )
                }
                "acks" | "request.required.acks" if !matches!(value.as_str(), "all" | "-1") => {
                    return err(
                        &key,
                        format!("acks = {value} would ack devices before every in-sync replica has the record; weir requires acks = all"),
                    )
                }
                "delivery.report.only.error" if value == "true" => {
                    return err(&key, "weir completes device acks from delivery reports; they cannot be turned off".into())
                }
                "transactional.id" => return err(&key, "transactions are not supported by the weir Kafka sink".into()),
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_default_config_parses_and_equals_the_built_in_defaults() {
        let parsed = Config::parse(DEFAULT_CONFIG, "weir.default.toml").unwrap();
        let built_in = Config::default();
        assert_eq!(format!("{parsed:?}"), format!("{built_in:?}"));
    }

    #[test]
    fn shipped_example_config_with_every_protocol_parses() {
        let text = include_str!("../../deploy/config/all-protocols.toml");
        let config = Config::parse(text, "all-protocols.toml").unwrap();
        let protocols: Vec<_> = config.listeners.iter().map(ListenerConfig::protocol).collect();
        assert_eq!(protocols, ["mqtt", "ws", "tcp", "tcp"]);
        // Uncomment the bridge block (from its `# [[listeners]]` to the next blank line).
        let start = text.find("# [[listeners]]").unwrap();
        let end = start + text[start..].find("\n\n").unwrap();
        let bridge = format!("{}{}{}", &text[..start], text[start..end].replace("# ", ""), &text[end..]);
        let config = Config::parse(&bridge, "all-protocols.toml").unwrap();
        assert_eq!(config.listeners.last().map(ListenerConfig::protocol), Some("mqtt_bridge"));
    }

    #[test]
    fn the_disk_buffer_is_checked() {
        let mqtt = "[[listeners]]\nprotocol = \"mqtt\"\nlisten = \"127.0.0.1:0\"\nack = \"buffered\"\n";
        let err = Config::parse(mqtt, "b.toml").unwrap_err().to_string();
        assert!(err.contains("listeners[0].ack") && err.contains("[buffer]"), "{err}");
        let buffered =
            |buffer: &str| Config::parse(&format!("{mqtt}[buffer]\nkind = \"disk\"\n{buffer}"), "b.toml");
        let config = buffered("").unwrap();
        let buffer = config.buffer.unwrap();
        assert_eq!(
            (buffer.max_bytes, buffer.segment_bytes, buffer.fsync),
            (1 << 30, 64 << 20, FsyncPolicy::Batch)
        );
        // The default 1 MiB packets need segments of at least 2 MiB + 4 KiB.
        let err = buffered("segment_bytes = 1048576\n").unwrap_err().to_string();
        assert!(err.contains("buffer.segment_bytes") && err.contains("2101248"), "{err}");
        let err = buffered("max_bytes = 100000000\nsegment_bytes = 67108864\n").unwrap_err().to_string();
        assert!(err.contains("buffer.max_bytes"), "{err}");
        let err = buffered("fsync = \"interval\"\nfsync_interval_ms = 0\n").unwrap_err().to_string();
        assert!(err.contains("buffer.fsync_interval_ms"), "{err}");
        let err = buffered("kind = \"memory\"\n").unwrap_err().to_string();
        assert!(err.contains("kind"), "{err}");
        let err = buffered("fsync = \"never\"\n").unwrap_err().to_string();
        assert!(err.contains("never"), "{err}");
    }

    #[test]
    fn listener_limits_are_checked() {
        let ws = "[[listeners]]\nprotocol = \"ws\"\nlisten = \"127.0.0.1:0\"\n";
        let err = Config::parse(&format!("{ws}max_message_bytes = 10\n"), "w.toml").unwrap_err().to_string();
        assert!(err.contains("listeners[0].max_message_bytes"), "{err}");
        let err = Config::parse(&format!("{ws}device_id_header = \"bad header\"\n"), "w.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("device_id_header"), "{err}");
        let tcp = "[[listeners]]\nprotocol = \"tcp\"\nlisten = \"0.0.0.0:7000\"\n";
        let err = Config::parse(tcp, "w.toml").unwrap_err().to_string();
        assert!(err.contains("allow_anonymous"), "{err}");
        let err = Config::parse(&format!("{tcp}allow_anonymous = true\nframing = \"xml\"\n"), "w.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("xml"), "{err}");
        let bridge = "[[listeners]]\nprotocol = \"mqtt_bridge\"\nfilters = [\"a/#\"]\n";
        let err =
            Config::parse(&format!("{bridge}broker = \"localhost\"\n"), "w.toml").unwrap_err().to_string();
        assert!(err.contains("listeners[0].broker"), "{err}");
        let err = Config::parse(
            "[[listeners]]\nprotocol = \"mqtt_bridge\"\nbroker = \"h:1\"\nfilters = []\n",
            "w.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("filters"), "{err}");
    }

    /// A self-signed certificate and its key, as PEM files in `dir`.
    fn cert_files(dir: &Path) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().self_signed(&key).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        (dir.join("cert.pem"), dir.join("key.pem"))
    }

    #[test]
    fn tls_settings_and_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = cert_files(dir.path());
        let mqtt = "[[listeners]]\nprotocol = \"mqtt\"\nlisten = \"127.0.0.1:0\"\n[listeners.tls]\n";
        let with = |extra: &str| {
            Config::parse(&format!("{mqtt}cert_file = {cert:?}\nkey_file = {key:?}\n{extra}"), "t.toml")
        };
        let config = with("").unwrap();
        let tls = config.listeners[0].tls().unwrap();
        assert_eq!((tls.handshake_timeout_ms, tls.min_version), (10_000, TlsVersion::Tls12));
        with("min_version = \"1.3\"\nhandshake_timeout_ms = 500\n").unwrap();
        // The server certificate may serve as its own client CA here: it parses.
        with(&format!("client_ca_file = {cert:?}\nidentity = \"san_dns\"\nclient_auth = \"optional\"\n"))
            .unwrap();

        for (extra, key, reason) in [
            ("client_auth = \"required\"\n", "listeners[0].tls.client_auth", "client_ca_file"),
            ("identity = \"cn\"\n", "listeners[0].tls.identity", "client_ca_file"),
            ("crl_files = [\"x.crl\"]\n", "listeners[0].tls.crl_files", "client_ca_file"),
            ("handshake_timeout_ms = 0\n", "listeners[0].tls.handshake_timeout_ms", "between"),
            (
                "client_ca_file = \"/nonexistent/ca.pem\"\n",
                "listeners[0].tls.client_ca_file",
                "/nonexistent/ca.pem",
            ),
        ] {
            let err = with(extra).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(reason), "{extra}: {err}");
        }
        let crl = dir.path().join("bad.crl");
        std::fs::write(&crl, b"not a CRL").unwrap();
        let err =
            with(&format!("client_ca_file = {cert:?}\ncrl_files = [{crl:?}]\n")).unwrap_err().to_string();
        assert!(err.contains("listeners[0].tls.crl_files"), "{err}");
        let err = with("min_version = \"1.1\"\n").unwrap_err().to_string();
        assert!(err.contains("1.1"), "{err}");
        let err = with("ciphers = \"all\"\n").unwrap_err().to_string();
        assert!(err.contains("ciphers"), "{err}");

        // A key that is not the certificate's, and a missing certificate.
        let other = tempfile::tempdir().unwrap();
        let (_, other_key) = cert_files(other.path());
        let text = format!("{mqtt}cert_file = {cert:?}\nkey_file = {other_key:?}\n");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("listeners[0].tls.key_file"), "{err}");
        let text = format!("{mqtt}cert_file = \"missing.pem\"\nkey_file = {key:?}\n");
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("listeners[0].tls.cert_file") && err.contains("missing.pem"), "{err}");

        let ops = format!("[ops.tls]\ncert_file = {cert:?}\nkey_file = \"nope.key\"\n");
        let err = Config::parse(&ops, "t.toml").unwrap_err().to_string();
        assert!(err.contains("ops.tls.key_file"), "{err}");
        let bridge = "[[listeners]]\nprotocol = \"mqtt_bridge\"\nbroker = \"h:1\"\nfilters = [\"a\"]\n[listeners.tls]\n";
        assert!(Config::parse(bridge, "t.toml").is_err());
    }

    #[test]
    fn relative_tls_paths_are_taken_from_the_config_files_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("certs")).unwrap();
        cert_files(&dir.path().join("certs"));
        let path = dir.path().join("weir.toml");
        std::fs::write(
            &path,
            "[[listeners]]\nprotocol = \"tcp\"\nlisten = \"127.0.0.1:0\"\n[listeners.tls]\ncert_file = \"certs/cert.pem\"\nkey_file = \"certs/key.pem\"\n",
        )
        .unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.listeners[0].tls().unwrap().cert_file, dir.path().join("certs/cert.pem"));
    }

    #[test]
    fn auth_settings_and_files_are_checked_and_paths_are_relative_to_the_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("auth")).unwrap();
        crate::auth::password::add_user(&dir.path().join("auth/users.txt"), "dev-1", b"pw").unwrap();
        std::fs::write(dir.path().join("auth/jwt.key"), "0123456789abcdef0123456789abcdef\n").unwrap();
        let public = "[[listeners]]\nprotocol = \"mqtt\"\nlisten = \"0.0.0.0:1883\"\n";
        let acl = "acl = [{ publish = \"devices/{device_id}/#\" }]\n";
        let load = |text: String| {
            let path = dir.path().join("weir.toml");
            std::fs::write(&path, text).unwrap();
            Config::load(&path)
        };
        // A configured provider satisfies the public-address rule.
        let config = load(format!(
            "{public}{acl}[listeners.auth]\nkind = \"password_file\"\npassword_file = \"auth/users.txt\"\n"
        ))
        .unwrap();
        let auth = config.listeners[0].auth().unwrap();
        assert_eq!(auth.password_file.as_deref(), Some(dir.path().join("auth/users.txt").as_path()));
        assert_eq!((auth.max_failures, auth.failures_per_minute), (10, 10));
        let config = load(format!(
            "{public}{acl}[listeners.auth]\nkind = \"jwt\"\njwt = {{ algorithm = \"HS256\", key_file = \"auth/jwt.key\" }}\n"
        ))
        .unwrap();
        let jwt = config.listeners[0].auth().unwrap().jwt.clone().unwrap();
        assert_eq!((jwt.device_id_claim.as_str(), jwt.leeway_s), ("sub", 30));

        for (auth, key, reason) in [
            ("kind = \"password_file\"\n", "listeners[0].auth.password_file", "needs"),
            (
                "kind = \"password_file\"\npassword_file = \"missing.txt\"\n",
                "listeners[0].auth.password_file",
                "missing.txt",
            ),
            ("kind = \"jwt\"\n", "listeners[0].auth.jwt", "needs"),
            (
                "kind = \"jwt\"\njwt = { algorithm = \"RS256\", key_file = \"auth/jwt.key\" }\n",
                "listeners[0].auth.jwt.key_file",
                "RSA",
            ),
            ("kind = \"jwt\"\njwt = { algorithm = \"none\", key_file = \"auth/jwt.key\" }\n", "", "none"),
            ("kind = \"ldap\"\n", "", "ldap"),
        ] {
            let err = load(format!("{public}{acl}[listeners.auth]\n{auth}")).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(reason), "{auth}: {err}");
        }
        let err = load(format!(
            "{public}[listeners.auth]\nkind = \"password_file\"\npassword_file = \"auth/users.txt\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("listeners[0].acl") && err.contains("no rule"), "{err}");
        let err = load(format!("{public}allow_anonymous = true\nacl = [{{ publish = \"a/#/b\" }}]\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("listeners[0].acl[0].publish"), "{err}");
        let err = load(format!("{public}allow_anonymous = true\nacl = [{{ subscribe = \"a\" }}]\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("subscribe"), "{err}");
    }

    #[test]
    fn empty_file_is_the_embedded_default() {
        let c = Config::parse("", "empty.toml").unwrap();
        assert!(matches!(c.sink, SinkConfig::Sqlite(_)));
        assert_eq!(c.listeners[0].listen(), Some("127.0.0.1:1883".parse().unwrap()));
    }

    #[test]
    fn unknown_keys_are_rejected_with_line() {
        let err = Config::parse("data_dir = \"x\"\n[fabric]\nlinger = 5\n", "w.toml").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("w.toml: "), "{text}");
        assert!(text.contains("line 3"), "{text}");
        assert!(text.contains("linger"), "{text}");
    }

    #[test]
    fn public_address_without_auth_is_refused() {
        let text = "[[listeners]]\nprotocol = \"mqtt\"\nlisten = \"0.0.0.0:1883\"\n";
        let err = Config::parse(text, "w.toml").unwrap_err().to_string();
        assert!(err.contains("listeners[0].listen") && err.contains("allow_anonymous"), "{err}");
        let ok = format!("{text}allow_anonymous = true\n");
        Config::parse(&ok, "w.toml").unwrap();
    }

    #[test]
    fn inconsistent_bounds_are_refused() {
        let err = Config::parse("[fabric]\nmax_records = 10\nbatch_max_records = 20\n", "w.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("fabric.batch_max_records"), "{err}");
        let err = Config::parse("[fabric]\nmax_bytes = 1000\n", "w.toml").unwrap_err().to_string();
        assert!(err.contains("max_packet_bytes"), "{err}");
    }

    #[test]
    fn kafka_options_that_break_the_ack_guarantee_are_rejected() {
        let base = "[sink]\nkind = \"kafka\"\nbrokers = \"127.0.0.1:9092\"\n";
        Config::parse(base, "k.toml").unwrap();
        let with =
            |opts: &str| Config::parse(&format!("{base}[sink.librdkafka_options]\n{opts}\n"), "k.toml");
        let err = with("\"enable.idempotence\" = false").unwrap_err().to_string();
        assert!(
            err.contains("sink.librdkafka_options.\"enable.idempotence\"") && err.contains("idempotent"),
            "{err}"
        );
        let err = with("\"acks\" = 1").unwrap_err().to_string();
        assert!(err.contains("acks = all"), "{err}");
        let err = with("\"delivery.report.only.error\" = true").unwrap_err().to_string();
        assert!(err.contains("delivery reports"), "{err}");
        let err = with("\"linger.ms\" = 50").unwrap_err().to_string();
        assert!(err.contains("linger_ms"), "{err}");
        with("\"acks\" = \"all\"\n\"socket.keepalive.enable\" = true\n\"message.max.bytes\" = 20000")
            .unwrap();
        // With every listener acking on receipt, idempotence is the user's call.
        let received = format!("{base}[sink.librdkafka_options]\n\"enable.idempotence\" = false\n[[listeners]]\nprotocol = \"mqtt\"\nack = \"received\"\n");
        Config::parse(&received, "k.toml").unwrap();
    }

    #[test]
    fn postgres_config_is_checked() {
        let base = "[sink]\nkind = \"postgres\"\nurl = \"postgres://weir@127.0.0.1:5433/weir\"\n";
        Config::parse(base, "p.toml").unwrap();
        let err = Config::parse(&format!("{base}table = \"bad-name\"\n"), "p.toml").unwrap_err().to_string();
        assert!(err.contains("sink.table"), "{err}");
        Config::parse(&format!("{base}table = \"iot.readings\"\n"), "p.toml").unwrap();
        let err =
            Config::parse("[sink]\nkind = \"postgres\"\nurl = \"postgres://a:b@h:notaport/db\"\n", "p.toml")
                .unwrap_err()
                .to_string();
        assert!(err.contains("sink.url"), "{err}");
    }

    #[test]
    fn kafka_topics_are_checked() {
        let base = "[sink]\nkind = \"kafka\"\nbrokers = \"b:9092\"\n";
        let err = Config::parse(&format!("{base}topic = \"bad topic\"\n"), "k.toml").unwrap_err().to_string();
        assert!(err.contains("sink.topic"), "{err}");
        let err =
            Config::parse(&format!("{base}topic = \"t.{{device}}\"\n"), "k.toml").unwrap_err().to_string();
        assert!(err.contains("placeholder"), "{err}");
        Config::parse(&format!("{base}topic = \"fixed-topic\"\n"), "k.toml").unwrap();
    }

    #[test]
    fn unknown_protocol_and_sink_kinds_are_rejected() {
        let err = Config::parse("[[listeners]]\nprotocol = \"carrier-pigeon\"\n", "w.toml").unwrap_err();
        assert!(err.to_string().contains("carrier-pigeon"), "{err}");
        let err = Config::parse("[sink]\nkind = \"s3\"\n", "w.toml").unwrap_err();
        assert!(err.to_string().contains("s3"), "{err}");
    }
}
