//! weir: an IoT telemetry ingestion gateway. [`start`] (or [`run`]) embeds a whole gateway:
//! listeners → fabric → batchers → sink driver, plus the ops HTTP listener.

pub mod ack;
pub mod auth;
pub mod buffer;
pub mod config;
pub mod fabric;
pub mod listener;
pub mod logs;
pub mod metrics;
pub mod ops;
pub mod sessions;
pub mod shutdown;
pub mod sink;
pub mod sources;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::auth::{ListenerAuth, PublishPolicy};
use crate::buffer::DiskBuffer;
use crate::config::{Config, ListenerConfig, SinkConfig};
use crate::fabric::{run_batcher, BatchLimits, Fabric};
use crate::listener::mqtt::MqttContext;
use crate::listener::tls::TlsServer;
use crate::metrics::Metrics;
use crate::shutdown::ShutdownSignal;
use crate::sink::{run_sink_driver, BlackholeSink, KafkaSink, PostgresSink, Sink, SqliteSink};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind { addr: SocketAddr, what: &'static str, source: std::io::Error },
    #[error("sink: {0}")]
    Sink(String),
    #[error("{0}")]
    Buffer(String),
    #[error("MQTT sessions: {0}")]
    Sessions(String),
    #[error("listener protocol {0:?} is not available in this build")]
    Unsupported(&'static str),
    #[error("TLS of {what}: {error}")]
    Tls { what: String, error: listener::tls::TlsSetupError },
    #[error("authentication of {what}: {reason}")]
    Auth { what: String, reason: String },
}

/// A running gateway. Dropping it does not stop it; call [`Gateway::shutdown`].
pub struct Gateway {
    listener_addrs: Vec<SocketAddr>,
    ops_addr: SocketAddr,
    metrics: Arc<Metrics>,
    grace: Duration,
    shutdown_tx: watch::Sender<bool>,
    shutdown_signal: Arc<ShutdownSignal>,
    abort_tx: watch::Sender<bool>,
    listeners: JoinSet<()>,
    pipeline: JoinSet<()>,
    /// Every TLS listener's certificates, for [`Gateway::reload_tls`].
    tls: Vec<Arc<TlsServer>>,
    /// Every listener's authentication, for [`Gateway::reload_auth`].
    auth: Vec<Arc<ListenerAuth>>,
    /// Per listener, in config order: what [`Gateway::reload_config`] changes in place.
    live: Vec<LiveListener>,
    /// The configuration in effect (the start's, with what reloads applied).
    running: std::sync::Mutex<Config>,
}

/// What [`Gateway::reload_tls`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsReload {
    /// Listeners now using the files as they are.
    pub reloaded: usize,
    /// Listeners whose files did not load; they keep their previous certificates.
    pub failed: usize,
}

/// Starts a gateway: binds every listener (port 0 picks a free port), opens the sink, and
/// spawns the tasks. Returns once it is accepting.
pub async fn start(config: Config) -> Result<Gateway, StartError> {
    let metrics = Arc::new(Metrics::new());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // Fired with `shutdown_tx`; what device connections wait on (cheaper per connection).
    let shutdown_signal = ShutdownSignal::new();
    let (abort_tx, abort_rx) = watch::channel(false);

    // Certificates are read before any socket binds (a bad file is a start error, as in
    // `weir check`).
    let tls_of = |settings: Option<&config::TlsConfig>, label: &'static str, what: String| {
        settings
            .map(|settings| {
                TlsServer::new(settings, label, Arc::clone(&metrics))
                    .map(Arc::new)
                    .map_err(|error| StartError::Tls { what, error })
            })
            .transpose()
    };
    let mut listener_tls = Vec::new();
    for (i, listener) in config.listeners.iter().enumerate() {
        listener_tls.push(tls_of(listener.tls(), listener.protocol(), format!("listeners[{i}]"))?);
    }
    let ops_tls = tls_of(config.ops.tls.as_ref(), "ops", "ops".into())?;
    // Password files and keys too, and the publish rules of each listener.
    let mut listener_auth = Vec::new();
    for (i, listener) in config.listeners.iter().enumerate() {
        let what = || format!("listeners[{i}]");
        let auth = listener
            .auth()
            .map(|a| ListenerAuth::new(a, Arc::clone(&metrics)).map(Arc::new))
            .transpose()
            .map_err(|reason| StartError::Auth { what: what(), reason })?;
        let rules: Vec<String> = listener.acl().iter().map(|r| r.publish.clone()).collect();
        let policy = PublishPolicy::new(&rules, auth.is_some())
            .map_err(|reason| StartError::Auth { what: what(), reason })?;
        listener_auth.push((auth, Arc::new(policy)));
    }
    // What a config reload changes in place, per listener.
    let live: Vec<LiveListener> = config
        .listeners
        .iter()
        .zip(&listener_auth)
        .map(|(listener, (auth, policy))| LiveListener {
            rates: listener.rates().map(|(m, b)| Arc::new(listener::throttle::RateLimits::new(m, b))),
            policy: Arc::clone(policy),
            authenticated: auth.is_some(),
        })
        .collect();
    let auth: Vec<Arc<ListenerAuth>> = listener_auth.iter().filter_map(|(a, _)| a.clone()).collect();
    let tls: Vec<Arc<TlsServer>> = listener_tls.iter().chain([&ops_tls]).flatten().cloned().collect();

    let mut bound = Vec::new();
    for listener in &config.listeners {
        let Some(addr) = listener.listen() else {
            bound.push(None);
            continue;
        };
        let socket = TcpListener::bind(addr).await.map_err(|source| StartError::Bind {
            addr,
            what: "device listener",
            source,
        })?;
        bound.push(Some((addr, socket)));
    }
    let ops_socket = TcpListener::bind(config.ops.listen).await.map_err(|source| StartError::Bind {
        addr: config.ops.listen,
        what: "ops",
        source,
    })?;

    let f = &config.fabric;
    let shard_count = f.shard_count();
    let (fabric, shards) =
        Fabric::new(shard_count, f.max_records, f.max_bytes, f.when_full, Arc::clone(&metrics));
    // Room for each shard to have one batch ready while the sink writes another.
    let (batches_tx, batches_rx) = flume::bounded(shard_count);
    let mut pipeline = JoinSet::new();
    // Sinks without a connection of their own are always "connected".
    metrics.sink_connected.set(1);
    // With a disk buffer, batches go through its log on their way to the sink.
    let (buffer, sink_input) = match &config.buffer {
        Some(buffer) => {
            let (buffer, sink_input) = DiskBuffer::start(
                buffer,
                &config.data_dir,
                f.batch_max_records,
                Arc::clone(&metrics),
                batches_rx,
            )
            .map_err(StartError::Buffer)?;
            (Some(buffer), sink_input)
        }
        None => (None, batches_rx),
    };
    let driver = Driver { input: sink_input, metrics: Arc::clone(&metrics), abort: abort_rx, buffer };
    match &config.sink {
        SinkConfig::Kafka(kafka) => {
            let sink = KafkaSink::open(kafka, Arc::clone(&metrics)).map_err(StartError::Sink)?;
            pipeline.spawn(driver.run(sink));
        }
        SinkConfig::Postgres(pg) => {
            let sink = PostgresSink::open(pg, Arc::clone(&metrics)).map_err(StartError::Sink)?;
            pipeline.spawn(driver.run(sink));
        }
        SinkConfig::Sqlite(sqlite) => {
            let sink = SqliteSink::open(&config.data_dir, sqlite).map_err(StartError::Sink)?;
            pipeline.spawn(driver.run(sink));
        }
        SinkConfig::Blackhole {} => {
            pipeline.spawn(driver.run(BlackholeSink));
        }
    }
    let limits = BatchLimits {
        max_records: f.batch_max_records,
        max_bytes: f.batch_max_bytes,
        linger: Duration::from_millis(f.linger_ms),
    };
    // Each shard's batcher tells the source table what its batches say about their devices.
    let sources = (config.sources.max_devices > 0)
        .then(|| sources::Sources::new(shard_count, config.sources.clone(), Arc::clone(&metrics)));
    for (index, shard) in shards.into_iter().enumerate() {
        let observer = sources.as_ref().map(|s| (Arc::clone(s), index));
        pipeline.spawn(run_batcher(shard, limits, batches_tx.clone(), observer));
    }
    if let Some(sources) = &sources {
        pipeline.spawn(sources::update_gauges_until(Arc::clone(sources), shutdown_rx.clone()));
    }
    drop(batches_tx);

    // Every MQTT listener shares one session store; its writer ends once they all have.
    let (sessions, sessions_writer) =
        sessions::Sessions::open(&config.data_dir, &config.sessions, Arc::clone(&metrics))
            .map_err(StartError::Sessions)?;
    pipeline.spawn(sessions_writer.wait());

    let mut listener_addrs = Vec::new();
    let mut listeners = JoinSet::new();
    for ((((listener, socket), tls), (listener_auth, policy)), live) in
        config.listeners.iter().zip(bound).zip(listener_tls).zip(listener_auth).zip(&live)
    {
        let rates = live.rates.clone().unwrap_or_default();
        if let Some((addr, socket)) = &socket {
            listener_addrs.push(socket.local_addr().map_err(|source| StartError::Bind {
                addr: *addr,
                what: "device listener",
                source,
            })?);
        }
        let socket = socket.map(|(_, socket)| socket);
        match (listener, socket) {
            (ListenerConfig::Mqtt(mqtt), Some(socket)) => {
                let ctx = Arc::new(
                    MqttContext::new(
                        mqtt.clone(),
                        fabric.clone(),
                        Arc::clone(&metrics),
                        weir_proto::SourceProtocol::Mqtt,
                    )
                    .with_sessions(Arc::clone(&sessions))
                    .with_auth(listener_auth, policy)
                    .with_rates(rates),
                );
                let signal = Arc::clone(&shutdown_signal);
                let max_connections = mqtt.max_connections;
                let max_packet_bytes = mqtt.max_packet_bytes;
                let shutdown = shutdown_rx.clone();
                let admission = admission(listener, "mqtt", &metrics);
                // One accept loop per kind, so that plain connections' tasks do not carry TLS.
                // A refused TLS connection is closed (answering would take a handshake).
                match tls {
                    None => listeners.spawn(listener::accept_loop(
                        socket,
                        "mqtt",
                        max_connections,
                        admission,
                        shutdown,
                        move |accepted| listener::mqtt::serve(accepted, Arc::clone(&ctx), signal.subscribe()),
                        move |stream, refusal| listener::mqtt::refuse(stream, refusal, max_packet_bytes),
                    )),
                    Some(tls) => listeners.spawn(listener::accept_loop(
                        socket,
                        "mqtt",
                        max_connections,
                        admission,
                        shutdown,
                        move |accepted| {
                            let (tls, ctx) = (Arc::clone(&tls), Arc::clone(&ctx));
                            listener::mqtt::serve_tls(accepted, tls, ctx, signal.subscribe())
                        },
                        |stream, _| listener::close_refused(stream),
                    )),
                };
            }
            (ListenerConfig::Ws(ws), Some(socket)) => {
                let ctx = Arc::new(listener::ws::WsContext::new(
                    ws.clone(),
                    fabric.clone(),
                    Arc::clone(&metrics),
                    Arc::clone(&shutdown_signal),
                    Arc::clone(&sessions),
                    listener::Controls { auth: listener_auth, policy, rates },
                ));
                let shutdown = shutdown_rx.clone();
                let admission = admission(listener, "ws", &metrics);
                match tls {
                    None => listeners.spawn(listener::accept_loop(
                        socket,
                        "ws",
                        ws.max_connections,
                        admission,
                        shutdown_rx.clone(),
                        move |accepted| listener::ws::serve(accepted, Arc::clone(&ctx), shutdown.clone()),
                        |stream, _| listener::close_refused(stream),
                    )),
                    Some(tls) => listeners.spawn(listener::accept_loop(
                        socket,
                        "ws",
                        ws.max_connections,
                        admission,
                        shutdown_rx.clone(),
                        move |accepted| {
                            let (tls, ctx) = (Arc::clone(&tls), Arc::clone(&ctx));
                            listener::ws::serve_tls(accepted, tls, ctx, shutdown.clone())
                        },
                        |stream, _| listener::close_refused(stream),
                    )),
                };
            }
            (ListenerConfig::Tcp(tcp), Some(socket)) => {
                let local_addr = socket.local_addr().map_err(|source| StartError::Bind {
                    addr: tcp.listen,
                    what: "device listener",
                    source,
                })?;
                let ctx = Arc::new(
                    listener::tcp::TcpContext::new(
                        tcp.clone(),
                        fabric.clone(),
                        Arc::clone(&metrics),
                        local_addr,
                    )
                    .with_rates(rates),
                );
                let signal = Arc::clone(&shutdown_signal);
                let admission = admission(listener, "tcp", &metrics);
                match tls {
                    None => listeners.spawn(listener::accept_loop(
                        socket,
                        "tcp",
                        tcp.max_connections,
                        admission,
                        shutdown_rx.clone(),
                        move |accepted| listener::tcp::serve(accepted, Arc::clone(&ctx), signal.subscribe()),
                        |stream, _| listener::close_refused(stream),
                    )),
                    Some(tls) => listeners.spawn(listener::accept_loop(
                        socket,
                        "tcp",
                        tcp.max_connections,
                        admission,
                        shutdown_rx.clone(),
                        move |accepted| {
                            let (tls, ctx) = (Arc::clone(&tls), Arc::clone(&ctx));
                            listener::tcp::serve_tls(accepted, tls, ctx, signal.subscribe())
                        },
                        |stream, _| listener::close_refused(stream),
                    )),
                };
            }
            (ListenerConfig::MqttBridge(bridge), None) => {
                listeners.spawn(listener::bridge::run(
                    bridge.clone(),
                    fabric.clone(),
                    Arc::clone(&metrics),
                    shutdown_rx.clone(),
                ));
            }
            (other, _) => return Err(StartError::Unsupported(other.protocol())),
        }
    }
    // Only the listeners hold the fabric now: when they end, the batchers see their input end.
    drop(fabric);
    // Likewise the session store: its writer thread ends after the last MQTT connection.
    drop(sessions);
    let ops_addr = ops_socket.local_addr().map_err(|source| StartError::Bind {
        addr: config.ops.listen,
        what: "ops",
        source,
    })?;
    pipeline.spawn(ops::serve(
        ops_socket,
        ops::OpsState { metrics: Arc::clone(&metrics), sources },
        ops_tls,
        shutdown_rx,
    ));
    tracing::info!(listeners = ?listener_addrs, ops = %ops_addr, shards = shard_count, "weir started");
    Ok(Gateway {
        listener_addrs,
        ops_addr,
        metrics,
        grace: Duration::from_millis(config.shutdown.grace_ms),
        shutdown_tx,
        shutdown_signal,
        abort_tx,
        listeners,
        pipeline,
        tls,
        auth,
        live,
        running: std::sync::Mutex::new(config),
    })
}

/// A listener's settings that a config reload changes in place.
struct LiveListener {
    /// `None` for the bridge.
    rates: Option<Arc<listener::throttle::RateLimits>>,
    policy: Arc<PublishPolicy>,
    /// Rules are enforced (default deny) with authentication even when there are none.
    authenticated: bool,
}

/// What [`Gateway::reload_config`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigReload {
    /// Settings now in effect (`listeners[0].acl`, ...).
    pub applied: Vec<String>,
    /// Sections or listeners that changed in ways only a restart applies; they keep running as
    /// they were.
    pub needs_restart: Vec<String>,
    /// Settings the new config has that could not be applied (kept as they were), with why.
    pub rejected: Vec<String>,
}

/// The admission control of a device listener.
fn admission(
    listener: &ListenerConfig,
    protocol: &'static str,
    metrics: &Metrics,
) -> Option<Arc<listener::admission::Admission>> {
    listener.admission().map(|config| listener::admission::Admission::new(config, protocol, metrics))
}

/// What the sink driver task needs, whatever the sink.
struct Driver {
    input: flume::Receiver<fabric::Batch>,
    metrics: Arc<Metrics>,
    abort: watch::Receiver<bool>,
    buffer: Option<DiskBuffer>,
}

impl Driver {
    async fn run<S: Sink>(self, sink: S) {
        let commit_log = self.buffer.as_ref().map(|b| Arc::clone(&b.commit_log));
        run_sink_driver(sink, self.input, self.metrics, self.abort, commit_log).await;
        if let Some(buffer) = self.buffer {
            // The sink is done: record its last commits in the log, and let the threads end.
            let _ = tokio::task::spawn_blocking(move || {
                buffer.commit_log.persist();
                buffer.join();
            })
            .await;
        }
    }
}

/// Runs a gateway until `shutdown` completes, then shuts it down within the grace period.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<ShutdownReport, StartError> {
    let gateway = start(config).await?;
    shutdown.await;
    Ok(gateway.shutdown().await)
}

/// How shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// False when the grace period ran out and remaining work was abandoned (unacked).
    pub clean: bool,
}

impl Gateway {
    /// Bound addresses of the device listeners, in config order (bridges, which bind nothing,
    /// are skipped).
    pub fn listener_addrs(&self) -> &[SocketAddr] {
        &self.listener_addrs
    }

    pub fn ops_addr(&self) -> SocketAddr {
        self.ops_addr
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Applies what can change on a running gateway from `new` (already validated, as by
    /// `Config::load`): per-connection message and byte rates and publish ACL rules of every
    /// listener, at once for every open connection. Anything else that differs is reported as
    /// needing a restart and keeps running as it was. TLS files and password files are re-read
    /// by [`Gateway::reload_tls`] and [`Gateway::reload_auth`] (SIGHUP does all three).
    pub fn reload_config(&self, new: Config) -> ConfigReload {
        let mut report = ConfigReload::default();
        let mut running = self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if new.listeners.len() != running.listeners.len() {
            report.needs_restart.push("listeners (added or removed)".into());
        }
        for (i, (new_listener, live)) in new.listeners.iter().zip(&self.live).enumerate() {
            let old = &running.listeners[i];
            if old.protocol() != new_listener.protocol() {
                report.needs_restart.push(format!("listeners[{i}] (protocol)"));
                continue;
            }
            // What differs beyond the settings applied in place.
            if format!("{:?}", new_listener.with_live_settings_of(old)) != format!("{old:?}") {
                report.needs_restart.push(format!("listeners[{i}] ({})", old.protocol()));
            }
            let mut merged = old.with_rates_of(new_listener);
            if let (Some(rates), Some(now), Some(next)) = (&live.rates, old.rates(), new_listener.rates()) {
                if now != next {
                    rates.set(next.0, next.1);
                    report.applied.push(format!("listeners[{i}].max_messages_per_s, max_bytes_per_s"));
                }
            }
            if old.acl() != new_listener.acl() {
                let rules: Vec<String> = new_listener.acl().iter().map(|r| r.publish.clone()).collect();
                match PublishPolicy::new(&rules, live.authenticated) {
                    Ok(policy) => {
                        live.policy.replace(policy);
                        report.applied.push(format!("listeners[{i}].acl"));
                        merged = merged.with_acl_of(new_listener);
                    }
                    Err(reason) => report.rejected.push(format!("listeners[{i}].acl: {reason}")),
                }
            }
            running.listeners[i] = merged;
        }
        let sections: [(&str, String, String); 8] = [
            ("data_dir", format!("{:?}", running.data_dir), format!("{:?}", new.data_dir)),
            ("ops", format!("{:?}", running.ops), format!("{:?}", new.ops)),
            ("sessions", format!("{:?}", running.sessions), format!("{:?}", new.sessions)),
            ("sources", format!("{:?}", running.sources), format!("{:?}", new.sources)),
            ("fabric", format!("{:?}", running.fabric), format!("{:?}", new.fabric)),
            ("sink", format!("{:?}", running.sink), format!("{:?}", new.sink)),
            ("buffer", format!("{:?}", running.buffer), format!("{:?}", new.buffer)),
            ("shutdown", format!("{:?}", running.shutdown), format!("{:?}", new.shutdown)),
        ];
        for (name, old, new) in sections {
            if old != new {
                report.needs_restart.push(name.into());
            }
        }
        let result =
            if report.needs_restart.is_empty() && report.rejected.is_empty() { "ok" } else { "partial" };
        self.metrics.config_reloads.get_or_create(&metrics::ResultLabel { result }).inc();
        tracing::info!(
            applied = ?report.applied,
            needs_restart = ?report.needs_restart,
            rejected = ?report.rejected,
            "config reloaded"
        );
        report
    }

    /// Counts a reload whose file did not load (the caller logs why); nothing changed.
    pub fn config_reload_failed(&self) {
        self.metrics.config_reloads.get_or_create(&metrics::ResultLabel { result: "error" }).inc();
    }

    /// Re-reads every TLS listener's certificate, key, client CAs and CRLs (what SIGHUP does).
    /// New handshakes use them; open connections keep going. A listener whose files fail to
    /// load keeps its previous certificates (logged, and counted in `weir_tls_reloads_total`).
    pub fn reload_tls(&self) -> TlsReload {
        let mut report = TlsReload { reloaded: 0, failed: 0 };
        for tls in &self.tls {
            match tls.reload() {
                Ok(()) => report.reloaded += 1,
                Err(_) => report.failed += 1,
            }
        }
        report
    }

    /// Re-reads every listener's password file (what SIGHUP does). A file that fails to load
    /// leaves its listener with the previous users (logged, and counted in
    /// `weir_auth_reloads_total`). Returns how many reloaded and how many failed.
    pub fn reload_auth(&self) -> (usize, usize) {
        let (mut reloaded, mut failed) = (0, 0);
        for auth in &self.auth {
            let result = auth.authenticator().reload();
            let label = metrics::ResultLabel { result: if result.is_ok() { "ok" } else { "error" } };
            self.metrics.auth_reloads.get_or_create(&label).inc();
            match result {
                Ok(()) => reloaded += 1,
                Err(reason) => {
                    tracing::error!(%reason, "password file not reloaded; the previous users stay");
                    failed += 1;
                }
            }
        }
        (reloaded, failed)
    }

    /// Stops in three bounded phases: stop accepting and reading; flush batches, wait for the
    /// sink's commits and send the last acks; when the grace period ends, abandon the rest
    /// (unacked, so devices resend) and return.
    pub async fn shutdown(mut self) -> ShutdownReport {
        tracing::info!(grace_ms = self.grace.as_millis() as u64, "shutting down");
        let _ = self.shutdown_tx.send(true);
        self.shutdown_signal.fire();
        let deadline = tokio::time::Instant::now() + self.grace;
        let drained = tokio::time::timeout_at(deadline, async {
            while self.listeners.join_next().await.is_some() {}
            while self.pipeline.join_next().await.is_some() {}
        })
        .await
        .is_ok();
        if !drained {
            tracing::warn!("grace period over; abandoning unfinished work (it was not acked)");
            let _ = self.abort_tx.send(true);
            self.listeners.shutdown().await;
            // Give the sink driver a moment to fail its batch cleanly, then stop everything.
            let _ = tokio::time::timeout(Duration::from_millis(200), async {
                while self.pipeline.join_next().await.is_some() {}
            })
            .await;
            self.pipeline.shutdown().await;
        }
        tracing::info!(clean = drained, "weir stopped");
        ShutdownReport { clean: drained }
    }
}
