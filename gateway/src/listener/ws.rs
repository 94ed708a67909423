//! The ws listener: one HTTP/1.1 port serving WebSocket ingest (`/ingest`), MQTT over WebSocket
//! (`/mqtt`, subprotocol `mqtt`) and webhook-style `POST /ingest`. HTTP parsing is hyper's; an
//! upgraded connection keeps running in the task (and under the permit) that accepted it.

use std::convert::Infallible;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use weir_proto::SourceProtocol;
use weir_protocols::framing::check_device_id;
use weir_protocols::payload::PayloadFormat;
use weir_protocols::reply::{Reply, ReplyFormat, Status};

use super::ingest::{IngestContext, MessageQueue};
use super::mqtt::MqttContext;
use super::throttle::{self, RateLimits, Throttle};
use super::tls::TlsServer;
use super::{Accepted, ByteStream};
use crate::auth::{AuthFailure, Authenticator, Credentials, ListenerAuth};
use crate::config::{MqttListenerConfig, WsListenerConfig};
use crate::fabric::Fabric;
use crate::metrics::{Metrics, ProtocolLabel, ProtocolReasonLabel};
use crate::sessions::Sessions;
use crate::shutdown::ShutdownSignal;

/// Bytes tungstenite reads from the socket at a time. It is allocated per connection for the
/// connection's life, so it is kept small: idle WebSocket connections must stay cheap.
const WS_READ_BUFFER: usize = 2 * 1024;
/// Replies are buffered up to this much and written together.
const WS_WRITE_BUFFER: usize = 8 * 1024;

/// What every connection of one ws listener shares.
pub struct WsContext {
    config: WsListenerConfig,
    ws_ingest: Arc<IngestContext>,
    http_ingest: Arc<IngestContext>,
    mqtt: Arc<MqttContext>,
    metrics: Arc<Metrics>,
    device_header: HeaderName,
    /// What MQTT-over-WebSocket sessions wait on at shutdown.
    shutdown_signal: Arc<ShutdownSignal>,
    /// Device authentication of every path (`/mqtt` through its MQTT context).
    auth: Option<Arc<ListenerAuth>>,
    /// Each WebSocket's message and byte rate, `/ingest` and `/mqtt` alike (changed in place by
    /// a config reload).
    rates: Arc<RateLimits>,
}

impl WsContext {
    pub fn new(
        config: WsListenerConfig,
        fabric: Fabric,
        metrics: Arc<Metrics>,
        shutdown_signal: Arc<ShutdownSignal>,
        sessions: Arc<Sessions>,
        controls: super::Controls,
    ) -> Self {
        let super::Controls { auth, policy, rates } = controls;
        let ws_ingest = Arc::new(IngestContext::new(
            fabric.clone(),
            Arc::clone(&metrics),
            SourceProtocol::Websocket,
            "ws",
            config.ack,
            config.keep_raw,
        ));
        let http_ingest = Arc::new(IngestContext::new(
            fabric.clone(),
            Arc::clone(&metrics),
            SourceProtocol::Http,
            "http",
            config.ack,
            config.keep_raw,
        ));
        // MQTT settings the ws listener does not name keep their MQTT listener defaults.
        #[allow(clippy::needless_update)]
        let mqtt_config = MqttListenerConfig {
            listen: config.listen,
            payload: config.payload,
            ack: config.ack,
            max_packet_bytes: config.max_packet_bytes,
            max_inflight: config.max_inflight,
            max_messages_per_s: config.max_messages_per_s,
            max_bytes_per_s: config.max_bytes_per_s,
            max_connections: config.max_connections,
            connect_timeout_ms: config.connect_timeout_ms,
            keep_raw: config.keep_raw,
            allow_anonymous: config.allow_anonymous,
            ..MqttListenerConfig::default()
        };
        let mqtt = Arc::new(
            MqttContext::new(mqtt_config, fabric, Arc::clone(&metrics), SourceProtocol::MqttWs)
                .with_sessions(sessions)
                .with_auth(auth.clone(), policy)
                .with_rates(Arc::clone(&rates)),
        );
        // Validated with the config.
        let device_header =
            config.device_id_header.parse().unwrap_or_else(|_| HeaderName::from_static("x-device-id"));
        Self { config, ws_ingest, http_ingest, mqtt, metrics, device_header, shutdown_signal, auth, rates }
    }

    fn ws_config(&self, max_message: usize) -> WebSocketConfig {
        let mut config = WebSocketConfig::default();
        config.read_buffer_size = WS_READ_BUFFER;
        config.write_buffer_size = WS_WRITE_BUFFER;
        config.max_write_buffer_size = WS_WRITE_BUFFER + max_message.max(64 << 10);
        config.max_message_size = Some(max_message);
        config.max_frame_size = Some(self.config.max_frame_bytes.min(max_message));
        config
    }
}

/// What an HTTP request turned into once its 101 response is out.
enum Upgrade {
    Ingest { on: OnUpgrade, device: String, proven: Proven },
    Mqtt { on: OnUpgrade },
}

/// Serves one connection: HTTP requests until it upgrades to a WebSocket, then that.
pub async fn serve(accepted: Accepted, ctx: Arc<WsContext>, shutdown: watch::Receiver<bool>) {
    let Accepted { stream, id, permit, peer } = accepted;
    let _ = stream.set_nodelay(true);
    serve_io(stream, id, peer.ip(), None, &ctx, shutdown).await;
    drop(permit);
}

/// Serves one connection over TLS (HTTPS, WSS): the handshake under its deadline, in this task,
/// then as [`serve`]. With mutual TLS the client certificate's identity is the device of
/// `/ingest` (a `?device=` or header naming another is refused with 403) and of `/mqtt`.
pub async fn serve_tls(
    accepted: Accepted,
    tls: Arc<TlsServer>,
    ctx: Arc<WsContext>,
    shutdown: watch::Receiver<bool>,
) {
    let Accepted { stream, id, permit, peer } = accepted;
    let _ = stream.set_nodelay(true);
    let mut stop = shutdown.clone();
    // Boxed: the handshake's state is large and gone once it is done.
    let handshaken = Box::pin(tls.handshake_until(stream, crate::shutdown::signalled(&mut stop))).await;
    if let Some(handshaken) = handshaken {
        serve_io(handshaken.stream, id, peer.ip(), handshaken.identity, &ctx, shutdown).await;
    }
    drop(permit);
}

async fn serve_io<I>(
    io: I,
    id: u64,
    peer: IpAddr,
    identity: Option<Arc<str>>,
    ctx: &Arc<WsContext>,
    shutdown: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The HTTP phase is its own future, so its state is gone once the WebSocket phase runs.
    let upgrade = Box::pin(serve_http(io, ctx, peer, identity.clone(), shutdown.clone())).await;
    match upgrade {
        Some(Upgrade::Ingest { on, device, proven }) => {
            if let Some(ws) = upgraded(on, ctx, ctx.config.max_message_bytes).await {
                run_ingest(ws, device, proven, ctx, shutdown).await;
            }
        }
        Some(Upgrade::Mqtt { on }) => {
            let max = ctx.config.max_packet_bytes.max(ctx.config.max_message_bytes);
            if let Some(ws) = upgraded(on, ctx, max).await {
                let stream = WsByteStream { ws, pending: None, eof: false };
                let watch = ctx.shutdown_signal.subscribe();
                let mqtt = Arc::clone(&ctx.mqtt);
                super::mqtt::serve_stream(stream, id, Some(peer), mqtt, watch, None, identity).await;
            }
        }
        None => {}
    }
}

/// HTTP/1.1 requests until the connection closes or upgrades; returns the upgrade, if any.
async fn serve_http<I>(
    io: I,
    ctx: &Arc<WsContext>,
    peer: IpAddr,
    identity: Option<Arc<str>>,
    mut shutdown: watch::Receiver<bool>,
) -> Option<Upgrade>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let upgrade: Arc<Mutex<Option<Upgrade>>> = Arc::new(Mutex::new(None));
    let service = {
        let ctx = Arc::clone(ctx);
        let upgrade = Arc::clone(&upgrade);
        service_fn(move |request| {
            let ctx = Arc::clone(&ctx);
            let upgrade = Arc::clone(&upgrade);
            let identity = identity.clone();
            async move { Ok::<_, Infallible>(route(request, &ctx, &upgrade, peer, identity).await) }
        })
    };
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(ctx.config.connect_timeout_ms))
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    let served = tokio::select! {
        served = &mut connection => served,
        _ = crate::shutdown::signalled(&mut shutdown) => {
            // Requests in flight finish (and get their answers); no new ones are read.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = served {
        tracing::debug!(%error, "http connection ended with an error");
    }
    upgrade.lock().map(|mut u| u.take()).unwrap_or(None)
}

async fn upgraded(
    on: OnUpgrade,
    ctx: &WsContext,
    max_message: usize,
) -> Option<WebSocketStream<TokioIo<Upgraded>>> {
    match on.await {
        Ok(io) => Some(
            WebSocketStream::from_raw_socket(
                TokioIo::new(io),
                Role::Server,
                Some(ctx.ws_config(max_message)),
            )
            .await,
        ),
        Err(error) => {
            tracing::debug!(%error, "websocket upgrade failed");
            None
        }
    }
}

async fn route(
    request: Request<Incoming>,
    ctx: &WsContext,
    upgrade: &Mutex<Option<Upgrade>>,
    peer: IpAddr,
    certified: Option<Arc<str>>,
) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    let proven = if path == "/ingest" {
        let label = if is_websocket_upgrade(request.headers()) { "ws" } else { "http" };
        match authenticate(&request, ctx, label, peer, certified).await {
            Ok(proven) => proven,
            Err(response) => return response,
        }
    } else {
        Proven { identity: certified, owner: false, expires: None }
    };
    let identity = proven.identity.as_deref();
    match request.uri().path() {
        "/ingest" if is_websocket_upgrade(request.headers()) => {
            let device = match device_id(&request, ctx, identity) {
                Ok(device) => device.unwrap_or_default(),
                Err((code, reason)) => {
                    if code == StatusCode::FORBIDDEN {
                        ctx.ws_ingest.count_error("identity_mismatch");
                    }
                    return json_error(code, Status::NotAuthorized, &reason);
                }
            };
            accept_websocket(request, None, upgrade, |on| Upgrade::Ingest { on, device, proven })
        }
        "/ingest" if request.method() == Method::POST => http_ingest(request, ctx, proven).await,
        "/ingest" => {
            let mut response = plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "/ingest takes POST (one JSON reading, a JSON array, or a protobuf DevicePayload) or a WebSocket upgrade\n",
            );
            response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, POST"));
            response
        }
        "/mqtt" if is_websocket_upgrade(request.headers()) => {
            let offered = request
                .headers()
                .get_all(header::SEC_WEBSOCKET_PROTOCOL)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .find(|p| p.eq_ignore_ascii_case("mqtt") || p.eq_ignore_ascii_case("mqttv3.1"))
                .map(str::to_owned);
            accept_websocket(request, offered, upgrade, |on| Upgrade::Mqtt { on })
        }
        "/mqtt" => plain(StatusCode::UPGRADE_REQUIRED, "/mqtt is MQTT over WebSocket (subprotocol mqtt)\n"),
        _ => plain(StatusCode::NOT_FOUND, "not found: use /ingest or /mqtt\n"),
    }
}

/// Who an `/ingest` request proved to be.
#[derive(Debug, Clone, Default)]
struct Proven {
    /// The device: authenticated by the listener's provider, else the TLS client certificate's.
    identity: Option<Arc<str>>,
    /// Authenticated by the provider: messages may hold only this device's records.
    owner: bool,
    /// When the token expires; a WebSocket is closed then.
    expires: Option<Instant>,
}

/// Checks an `/ingest` request's `Authorization` (`Basic` for a password file, `Bearer` for
/// JWT) when the listener authenticates devices: 401 with `WWW-Authenticate` when missing or
/// wrong, 429 when its address failed too often, 403 when it contradicts the certificate.
async fn authenticate<B>(
    request: &Request<B>,
    ctx: &WsContext,
    label: &'static str,
    peer: IpAddr,
    certified: Option<Arc<str>>,
) -> Result<Proven, Response<Full<Bytes>>> {
    let Some(auth) = &ctx.auth else {
        return Ok(Proven { identity: certified, owner: false, expires: None });
    };
    let (username, password) = authorization(request.headers());
    let credentials = Credentials { username: username.as_deref(), password: password.as_deref() };
    match auth.authenticate(label, Some(peer), credentials).await {
        Ok(authenticated) => {
            if let Some(certified) = certified.filter(|c| **c != *authenticated.device_id) {
                let failure = AuthFailure::IdentityMismatch(format!(
                    "authenticated as {:?}, the client certificate names {certified:?}",
                    authenticated.device_id
                ));
                auth.count_failure(label, &failure);
                return Err(json_error(StatusCode::FORBIDDEN, Status::NotAuthorized, &failure.to_string()));
            }
            let expires = authenticated.expires.map(|at| {
                Instant::now() + at.duration_since(std::time::SystemTime::now()).unwrap_or_default()
            });
            Ok(Proven { identity: Some(authenticated.device_id), owner: true, expires })
        }
        Err(AuthFailure::RateLimited) => {
            let mut response = json_error(
                StatusCode::TOO_MANY_REQUESTS,
                Status::NotAuthorized,
                &AuthFailure::RateLimited.to_string(),
            );
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
            Err(response)
        }
        Err(failure) => {
            let mut response =
                json_error(StatusCode::UNAUTHORIZED, Status::NotAuthorized, &failure.to_string());
            let challenge = match auth.authenticator() {
                Authenticator::Password { .. } => "Basic realm=\"weir\"",
                Authenticator::Jwt(_) => "Bearer realm=\"weir\"",
            };
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
            Err(response)
        }
    }
}

/// The user and password of `Authorization: Basic`, or the token of `Bearer` (as the
/// password); nothing for a missing or unreadable header.
fn authorization(headers: &HeaderMap) -> (Option<String>, Option<Vec<u8>>) {
    use base64::Engine;
    let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return (None, None);
    };
    let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return (None, Some(rest.as_bytes().to_vec()));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD.decode(rest).ok();
        if let Some((user, password)) =
            decoded.as_deref().and_then(|d| std::str::from_utf8(d).ok()).and_then(|t| t.split_once(':'))
        {
            return (Some(user.to_owned()), Some(password.as_bytes().to_vec()));
        }
    }
    (None, None)
}

fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let has_token = |name: HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    has_token(header::UPGRADE, "websocket") && has_token(header::CONNECTION, "upgrade")
}

/// Answers a valid upgrade request with 101 and leaves the upgrade for the connection task.
fn accept_websocket(
    mut request: Request<Incoming>,
    subprotocol: Option<String>,
    upgrade: &Mutex<Option<Upgrade>>,
    kind: impl FnOnce(OnUpgrade) -> Upgrade,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "a WebSocket upgrade is a GET\n");
    }
    if request.headers().get(header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        let mut response = plain(StatusCode::UPGRADE_REQUIRED, "WebSocket version 13 only\n");
        response.headers_mut().insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return response;
    }
    let Some(key) = request.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return plain(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n");
    };
    let accept = derive_accept_key(key.as_bytes());
    let on = hyper::upgrade::on(&mut request);
    if let Ok(mut slot) = upgrade.lock() {
        *slot = Some(kind(on));
    }
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Some(protocol) = subprotocol.and_then(|p| HeaderValue::from_str(&p).ok()) {
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    response
}

/// The device named by `?device=` or the configured header, else by the TLS client certificate
/// (`identity`); `None` when none is given (then each reading must name its device). A name
/// that is not a valid device id is a 400; one that is not the certificate's identity a 403.
fn device_id<B>(
    request: &Request<B>,
    ctx: &WsContext,
    identity: Option<&str>,
) -> Result<Option<String>, (StatusCode, String)> {
    let named = named_device_id(request, ctx).map_err(|reason| (StatusCode::BAD_REQUEST, reason))?;
    match (named, identity) {
        (Some(named), Some(identity)) if named != identity => Err((
            StatusCode::FORBIDDEN,
            format!("device {named:?} is not the client certificate's identity {identity:?}"),
        )),
        (None, Some(identity)) => Ok(Some(identity.to_owned())),
        (named, _) => Ok(named),
    }
}

/// The device named by `?device=` or the configured header, checked.
fn named_device_id<B>(request: &Request<B>, ctx: &WsContext) -> Result<Option<String>, String> {
    let from_query = request.uri().query().and_then(|query| {
        query.split('&').find_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            (name == "device").then(|| percent_decode(value))
        })
    });
    let id = match from_query {
        Some(decoded) => Some(
            decoded.ok_or_else(|| "the device parameter is not valid percent-encoded UTF-8".to_owned())?,
        ),
        None => match request.headers().get(&ctx.device_header) {
            Some(value) => Some(
                value
                    .to_str()
                    .map_err(|_| format!("header {} is not valid text", ctx.device_header))?
                    .to_owned(),
            ),
            None => None,
        },
    };
    if let Some(id) = &id {
        check_device_id(id).map_err(|e| e.to_string())?;
    }
    Ok(id)
}

pub(crate) fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Why a WebSocket ingest connection ended; the label of `weir_connections_closed_total`.
fn close_label(reason: &Closed) -> &'static str {
    match reason {
        Closed::Peer => "peer_closed",
        Closed::Idle => "idle_timeout",
        Closed::TooLarge => "too_large",
        Closed::Protocol => "protocol_error",
        Closed::Shutdown => "shutdown",
        Closed::Io => "io_error",
        Closed::Expired => "credentials_expired",
    }
}

enum Closed {
    Peer,
    Idle,
    TooLarge,
    Protocol,
    Shutdown,
    Io,
    Expired,
}

async fn run_ingest(
    mut ws: WebSocketStream<TokioIo<Upgraded>>,
    device: String,
    proven: Proven,
    ctx: &WsContext,
    mut shutdown: watch::Receiver<bool>,
) {
    let label = ProtocolLabel { protocol: "ws" };
    ctx.metrics.connections_opened.get_or_create(&label).inc();
    ctx.metrics.connections_active.get_or_create(&label).inc();
    if !device.is_empty() {
        tracing::Span::current().record("device", device.as_str());
    }
    let owner = proven.identity.filter(|_| proven.owner);
    let mut queue = MessageQueue::new(Arc::clone(&ctx.ws_ingest), ctx.config.max_inflight).owned_by(owner);
    let idle = (ctx.config.idle_timeout_ms > 0).then(|| Duration::from_millis(ctx.config.idle_timeout_ms));
    let mut last_input = Instant::now();
    // The device's message and byte budget; over it, the socket is not read for a while.
    let mut throttle = Throttle::default();
    let mut replies = Vec::new();
    // Set once reading is over: the close frame to send after the last reply.
    let mut ending: Option<(Closed, Option<CloseFrame>)> = None;
    let closed = loop {
        queue.take_replies(&mut replies);
        if !replies.is_empty() {
            if let Err(error) = send_replies(&mut ws, &mut replies).await {
                tracing::debug!(%error, "websocket write failed");
                break Closed::Io;
            }
        }
        if let Some((_, frame)) = &ending {
            if queue.pending() == 0 {
                let _ = ws.close(frame.clone()).await;
                break ending.map_or(Closed::Peer, |(reason, _)| reason);
            }
        }
        if replies.capacity() > 0 {
            replies = Vec::new();
        }
        queue.release_idle_memory();
        let reading = ending.is_none() && queue.can_read() && !throttle.is_paused();
        let idle_deadline = idle.filter(|_| reading && queue.pending() == 0).map(|d| last_input + d);
        tokio::select! {
            message = ws.next(), if reading => {
                let now = Instant::now();
                last_input = now;
                let size = match &message {
                    Some(Ok(Message::Text(text))) => Some(text.len()),
                    Some(Ok(Message::Binary(payload))) => Some(payload.len()),
                    _ => None,
                };
                if let Some(pause) = size.and_then(|size| throttle.charge(&ctx.rates, size, now)) {
                    throttle::count_pause(&ctx.metrics, "ws", pause, now);
                }
                match message {
                    Some(Ok(Message::Text(text))) => {
                        let payload = Bytes::from(text);
                        if queue.submit(&device, "/ingest", PayloadFormat::Json, ReplyFormat::Json, payload).await.is_err() {
                            ending = Some((Closed::Shutdown, None));
                        }
                    }
                    Some(Ok(Message::Binary(payload))) => {
                        if queue.submit(&device, "/ingest", PayloadFormat::Protobuf, ReplyFormat::Protobuf, payload).await.is_err() {
                            ending = Some((Closed::Shutdown, None));
                        }
                    }
                    // tungstenite answers pings itself; pongs and raw frames carry nothing.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    Some(Ok(Message::Close(_))) | None => ending = Some((Closed::Peer, None)),
                    Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size }))) => {
                        let reason = format!("message of {size} bytes is larger than the limit of {max_size}");
                        tracing::debug!(%reason, "closing websocket");
                        queue.refuse(ReplyFormat::Json, Status::TooLarge, reason);
                        let frame = CloseFrame { code: CloseCode::Size, reason: "message too large".into() };
                        ending = Some((Closed::TooLarge, Some(frame)));
                    }
                    Some(Err(error)) => {
                        tracing::debug!(%error, "websocket read failed");
                        ctx.ws_ingest.count_error("websocket_protocol");
                        let frame = CloseFrame { code: CloseCode::Protocol, reason: "protocol error".into() };
                        ending = Some((Closed::Protocol, Some(frame)));
                    }
                }
            }
            event = queue.next_outcome() => queue.apply(event),
            _ = sleep_until_some(throttle.paused_until()), if ending.is_none() && throttle.is_paused() => {
                throttle.resume_if_due(Instant::now());
                // The pause was weir's doing, not the device's silence.
                last_input = Instant::now();
            }
            _ = sleep_until_some(idle_deadline) => {
                let frame = CloseFrame { code: CloseCode::Away, reason: "idle timeout".into() };
                ending = Some((Closed::Idle, Some(frame)));
            }
            _ = sleep_until_some(proven.expires), if ending.is_none() => {
                // 1008: policy violation, the code for "not (or no longer) allowed".
                let frame = CloseFrame { code: CloseCode::Policy, reason: "credentials expired".into() };
                ending = Some((Closed::Expired, Some(frame)));
            }
            _ = crate::shutdown::signalled(&mut shutdown), if ending.is_none() => {
                let frame = CloseFrame { code: CloseCode::Away, reason: "gateway shutting down".into() };
                ending = Some((Closed::Shutdown, Some(frame)));
            }
        }
    };
    tracing::debug!(reason = close_label(&closed), "websocket closed");
    ctx.metrics.connections_active.get_or_create(&label).dec();
    ctx.metrics
        .connections_closed
        .get_or_create(&ProtocolReasonLabel { protocol: "ws", reason: close_label(&closed) })
        .inc();
}

async fn send_replies(
    ws: &mut WebSocketStream<TokioIo<Upgraded>>,
    replies: &mut Vec<Reply>,
) -> Result<(), WsError> {
    for reply in replies.drain(..) {
        let mut out = Vec::with_capacity(48);
        reply.write(&mut out);
        let message = match reply.format {
            ReplyFormat::Json => Message::Text(String::from_utf8(out).unwrap_or_default().into()),
            ReplyFormat::Protobuf => Message::Binary(out.into()),
        };
        ws.feed(message).await?;
    }
    ws.flush().await
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// `POST /ingest`: a JSON reading, a JSON array of readings (each answered on its own), or a
/// protobuf DevicePayload. Answered after the commit: 200 when every item is stored, 400 when
/// some were undecodable (they are dead-lettered, the rest stored), 413 when too large, 503 with
/// Retry-After when weir has no room now (resend).
async fn http_ingest(request: Request<Incoming>, ctx: &WsContext, proven: Proven) -> Response<Full<Bytes>> {
    let identity = proven.identity.as_deref();
    let max = ctx.config.max_message_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        ctx.http_ingest.count_error("too_large");
        let reason = format!("body of {} bytes is larger than the limit of {max}", declared.unwrap_or(0));
        return json_error(StatusCode::PAYLOAD_TOO_LARGE, Status::TooLarge, &reason);
    }
    let device = match device_id(&request, ctx, identity) {
        Ok(device) => device.unwrap_or_default(),
        Err((code, reason)) => {
            if code == StatusCode::FORBIDDEN {
                ctx.http_ingest.count_error("identity_mismatch");
            }
            return json_error(code, Status::NotAuthorized, &reason);
        }
    };
    let format = match request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        Some(t) if is_protobuf_content_type(t) => PayloadFormat::Protobuf,
        _ => PayloadFormat::Json,
    };
    let body = match Limited::new(request.into_body(), max).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            ctx.http_ingest.count_error("too_large");
            let reason = format!("body is larger than the limit of {max} bytes");
            return json_error(StatusCode::PAYLOAD_TOO_LARGE, Status::TooLarge, &reason);
        }
        Err(error) => {
            tracing::debug!(%error, "could not read request body");
            return json_error(
                StatusCode::BAD_REQUEST,
                Status::Undecodable,
                "could not read the request body",
            );
        }
    };
    let items = split_json_array(format, &body);
    let owner = proven.identity.clone().filter(|_| proven.owner);
    let mut queue =
        MessageQueue::answering_busy(Arc::clone(&ctx.http_ingest), items.len().max(1)).owned_by(owner);
    let reply_format =
        if format == PayloadFormat::Protobuf { ReplyFormat::Protobuf } else { ReplyFormat::Json };
    for item in items {
        if queue.submit(&device, "/ingest", format, reply_format, item).await.is_err() {
            break;
        }
    }
    let mut replies = Vec::new();
    loop {
        queue.take_replies(&mut replies);
        if queue.pending() == 0 {
            break;
        }
        let event = queue.next_outcome().await;
        queue.apply(event);
    }
    http_response(&replies)
}

fn is_protobuf_content_type(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    [
        "application/x-protobuf",
        "application/protobuf",
        "application/vnd.google.protobuf",
        "application/octet-stream",
    ]
    .iter()
    .any(|t| essence.eq_ignore_ascii_case(t))
}

/// A JSON array is split into its elements, each one message with its own answer; anything else
/// (an object, protobuf, or JSON that does not parse) is one message.
fn split_json_array(format: PayloadFormat, body: &Bytes) -> Vec<Bytes> {
    if format == PayloadFormat::Json && body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        if let Ok(elements) = serde_json::from_slice::<Vec<&serde_json::value::RawValue>>(body) {
            if !elements.is_empty() {
                return elements.iter().map(|raw| body.slice_ref(raw.get().as_bytes())).collect();
            }
        }
    }
    vec![body.clone()]
}

fn http_response(replies: &[Reply]) -> Response<Full<Bytes>> {
    let worst = |status: Status| replies.iter().any(|r| r.status == status);
    let (code, retry) = if worst(Status::TooLarge) {
        (StatusCode::PAYLOAD_TOO_LARGE, false)
    } else if worst(Status::Unavailable) {
        (StatusCode::SERVICE_UNAVAILABLE, true)
    } else if worst(Status::NotAuthorized) {
        (StatusCode::FORBIDDEN, false)
    } else if worst(Status::Undecodable) {
        (StatusCode::BAD_REQUEST, false)
    } else {
        (StatusCode::OK, false)
    };
    let accepted = replies.iter().filter(|r| r.status == Status::Ok).count();
    let mut body = format!("{{\"accepted\":{accepted},\"results\":[").into_bytes();
    for (i, reply) in replies.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        reply.write_json(&mut body);
    }
    body.extend_from_slice(b"]}\n");
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if retry {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

fn json_error(code: StatusCode, status: Status, reason: &str) -> Response<Full<Bytes>> {
    let mut body = format!("{{\"error\":\"{}\",\"reason\":", status.as_str()).into_bytes();
    let _ = serde_json::to_writer(&mut body, reason);
    body.extend_from_slice(b"}\n");
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn plain(code: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// MQTT over WebSocket as a byte stream: binary messages are concatenated (an MQTT packet may
/// span messages, a message may hold several packets). Nothing is buffered here while idle.
struct WsByteStream {
    ws: WebSocketStream<TokioIo<Upgraded>>,
    /// A message received by `readable` and not yet taken.
    pending: Option<Bytes>,
    eof: bool,
}

impl ByteStream for WsByteStream {
    async fn readable(&mut self) -> io::Result<()> {
        while self.pending.is_none() && !self.eof {
            match self.ws.next().await {
                Some(Ok(Message::Binary(bytes))) if !bytes.is_empty() => self.pending = Some(bytes),
                Some(Ok(Message::Binary(_) | Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "MQTT over WebSocket needs binary frames",
                    ))
                }
                Some(Ok(Message::Close(_))) | None => self.eof = true,
                Some(Err(error)) => return Err(io::Error::other(error)),
            }
        }
        Ok(())
    }

    fn try_read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self.pending.take() {
            Some(bytes) => {
                buf.extend_from_slice(&bytes);
                Ok(bytes.len())
            }
            None if self.eof => Ok(0),
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.ws.send(Message::Binary(Bytes::copy_from_slice(bytes))).await.map_err(io::Error::other)
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        self.ws.close(None).await.map_err(io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("plant%2F7%20a").as_deref(), Some("plant/7 a"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), None);
    }

    #[test]
    fn json_arrays_are_split_into_messages() {
        let body = Bytes::from_static(br#" [{"seq":1,"t":1}, {"seq":2,"t":[1,2]}] "#);
        let items = split_json_array(PayloadFormat::Json, &body);
        assert_eq!(items.len(), 2);
        assert_eq!(&items[1][..], br#"{"seq":2,"t":[1,2]}"#);
        let object = Bytes::from_static(br#"{"seq":1}"#);
        assert_eq!(split_json_array(PayloadFormat::Json, &object).len(), 1);
        let broken = Bytes::from_static(b"[{");
        assert_eq!(split_json_array(PayloadFormat::Json, &broken).len(), 1);
    }
}
