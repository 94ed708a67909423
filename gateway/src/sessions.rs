//! MQTT persistent sessions: which client ids have a session that outlives their connection
//! (3.1.1 Clean Session 0, MQTT 5 Session Expiry Interval > 0), kept durably in
//! `data_dir/sessions.db` so that a device reconnecting after a restart is told Session Present =
//! 1 and resends what was not acknowledged; and which connection holds each client id now, so
//! that a new connection takes the session over.
//!
//! weir keeps no message state in a session: a QoS 1/2 message is acknowledged only after it is
//! stored, so what a session must carry across a restart is only that it exists (the device
//! keeps the unacknowledged messages and resends them when the session is present).
//!
//! One writer thread owns the database. Connections send it requests over a bounded channel; it
//! applies every request queued at that moment in one transaction (one fsync for a reconnect
//! storm, not one per device) and answers each requester only after that transaction committed,
//! so a CONNACK never promises a session that a crash could lose.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use tokio::sync::oneshot;
use weir_protocols::mqtt::session::{ConnectDecision, ConnectRefusal, ConnectRequest};
use weir_protocols::mqtt::ProtocolVersion;

use crate::config::SessionsConfig;
use crate::metrics::{Metrics, ReasonLabel};

/// The database file, in `data_dir`.
pub const SESSIONS_FILE: &str = "sessions.db";

/// Requests waiting for the writer; when full, connecting devices wait (their CONNACK later).
const REQUESTS_CAPACITY: usize = 4096;

/// Most requests applied in one transaction.
const MAX_GROUP: usize = 4096;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS mqtt_sessions (
    client_id        TEXT    PRIMARY KEY,
    protocol_version INTEGER NOT NULL,  -- 3 (3.1), 4 (3.1.1), 5
    expiry_s         INTEGER NOT NULL,  -- Session Expiry Interval granted, counted from the disconnect
    created_ms       INTEGER NOT NULL,
    connected_ms     INTEGER NOT NULL,
    disconnected_ms  INTEGER,           -- NULL while a connection holds the session
    expires_ms       INTEGER,           -- disconnected_ms + expiry; NULL while connected
    connection_id    INTEGER            -- the connection holding it, in the running process
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS mqtt_sessions_expires ON mqtt_sessions (expires_ms) WHERE expires_ms IS NOT NULL;
CREATE TABLE IF NOT EXISTS mqtt_sessions_meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
";

/// `mqtt_sessions_meta` key: when the writer last knew weir to be running (wall clock, ms).
const ALIVE_KEY: &str = "alive_ms";

/// Why the store could not answer; a persistent CONNECT is then refused "server unavailable".
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("session store: {0}")]
    Sqlite(String),
    #[error("the session store writer has stopped")]
    Stopped,
}

/// What the store found for a CONNECT, durable once received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// `present`: a stored, unexpired session is resumed. `stored`: a record exists now and
    /// must be updated when the connection ends.
    Accepted { present: bool, stored: bool },
    /// A new session would exceed `max_sessions`.
    Full,
}

/// One CONNECT as the store records it.
#[derive(Debug)]
struct ConnectRecord {
    client_id: String,
    protocol_version: u8,
    clean_start: bool,
    expiry_s: u32,
    connection_id: u64,
}

enum Request {
    Connect {
        record: ConnectRecord,
        reply: oneshot::Sender<Result<Verdict, StoreError>>,
    },
    /// A connection that held a stored session ended; `expiry_s` replaces the stored interval
    /// (MQTT 5 DISCONNECT).
    Disconnect {
        client_id: String,
        connection_id: u64,
        expiry_s: Option<u32>,
    },
}

/// What a connection's CONNECT came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decided {
    pub decision: ConnectDecision,
    /// The store may hold a record for this connection: tell it when the connection ends.
    pub stored: bool,
}

/// Every MQTT listener's view of sessions: the durable store (none when `max_sessions = 0`) and
/// the live connection of each client id.
pub struct Sessions {
    requests_tx: Option<flume::Sender<Request>>,
    max_expiry_s: u32,
    /// One entry per connected MQTT client (about 100 bytes with its [`Takeover`]).
    live: Mutex<HashMap<Box<str>, Holder>>,
    metrics: Arc<Metrics>,
}

struct Holder {
    connection_id: u64,
    takeover: Arc<Takeover>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("durable", &self.requests_tx.is_some())
            .field("max_expiry_s", &self.max_expiry_s)
            .finish_non_exhaustive()
    }
}

/// Completes when the writer thread has finished (its last transaction committed).
pub struct WriterDone(Option<oneshot::Receiver<()>>);

impl WriterDone {
    pub async fn wait(self) {
        if let Some(done) = self.0 {
            let _ = done.await;
        }
    }
}

impl Sessions {
    /// No durable sessions: every CONNECT is accepted with Session Present = 0 and (MQTT 5) a
    /// granted Session Expiry Interval of 0. Takeover of a live client id still applies.
    pub fn without_store(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self { requests_tx: None, max_expiry_s: 0, live: Mutex::default(), metrics })
    }

    /// Opens (creating if missing) `data_dir/sessions.db`, ends the sessions the previous run
    /// left connected, removes the expired ones, and starts the writer thread. With
    /// `max_sessions = 0` nothing is opened: see [`Sessions::without_store`].
    pub fn open(
        data_dir: &Path,
        config: &SessionsConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(Arc<Self>, WriterDone), String> {
        if config.max_sessions == 0 {
            return Ok((Self::without_store(metrics), WriterDone(None)));
        }
        std::fs::create_dir_all(data_dir)
            .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
        let path = data_dir.join(SESSIONS_FILE);
        let writer = Writer::open(&path, config, Arc::clone(&metrics))
            .map_err(|e| format!("cannot prepare {}: {e}", path.display()))?;
        let (requests_tx, requests_rx) = flume::bounded(REQUESTS_CAPACITY);
        let (done_tx, done_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("weir-sessions".into())
            .spawn(move || {
                writer.run(requests_rx);
                let _ = done_tx.send(());
            })
            .map_err(|e| format!("cannot start the session writer: {e}"))?;
        let sessions = Self {
            requests_tx: Some(requests_tx),
            max_expiry_s: config.max_expiry_s,
            live: Mutex::default(),
            metrics,
        };
        Ok((Arc::new(sessions), WriterDone(Some(done_rx))))
    }

    /// The Session Expiry Interval weir grants `request`: what MQTT 5 asked for up to
    /// `max_expiry_s`; for 3.1.1 Clean Session 0 (no expiry of its own), `max_expiry_s`. An
    /// assigned client id gets none: it is made up for this connection only (and not unique
    /// across restarts), so no device could resume it.
    pub fn granted_expiry(&self, request: &ConnectRequest) -> u32 {
        if self.requests_tx.is_none() || request.assigned {
            return 0;
        }
        match request.session_expiry_secs {
            Some(asked) => asked.min(self.max_expiry_s),
            None if request.clean_start => 0,
            None => self.max_expiry_s,
        }
    }

    /// Whether deciding `request` may leave a session record held by its connection.
    pub fn may_store(&self, request: &ConnectRequest) -> bool {
        self.requests_tx.is_some()
            && !request.assigned
            && (self.granted_expiry(request) > 0 || !request.clean_start)
    }

    /// Decides a CONNECT: looks the session up and records it durably before answering. A
    /// store failure refuses a persistent session ("server unavailable": it could not be
    /// promised) and accepts a clean one (it promises nothing).
    pub async fn decide(&self, request: &ConnectRequest, connection_id: u64) -> Decided {
        let granted = self.granted_expiry(request);
        let clean = Decided {
            decision: ConnectDecision::Accept { session_present: false, session_expiry_secs: 0 },
            stored: false,
        };
        let Some(requests_tx) = &self.requests_tx else { return clean };
        if request.assigned {
            return clean;
        }
        let persistent = granted > 0 || !request.clean_start;
        let record = ConnectRecord {
            client_id: request.client_id.clone(),
            protocol_version: protocol_level(request.version),
            clean_start: request.clean_start,
            expiry_s: granted,
            connection_id,
        };
        let (reply, verdict) = oneshot::channel();
        let verdict = match self.send(requests_tx, Request::Connect { record, reply }).await {
            Ok(()) => verdict.await.unwrap_or(Err(StoreError::Stopped)),
            Err(error) => Err(error),
        };
        match verdict {
            Ok(Verdict::Accepted { present, stored }) => {
                if present {
                    self.metrics.mqtt_sessions_resumed.inc();
                }
                let decision =
                    ConnectDecision::Accept { session_present: present, session_expiry_secs: granted };
                Decided { decision, stored }
            }
            Ok(Verdict::Full) => {
                self.refused("max_sessions");
                tracing::warn!(
                    client_id = request.client_id,
                    "persistent session refused: max_sessions reached"
                );
                Decided { decision: ConnectDecision::Refuse(ConnectRefusal::QuotaExceeded), stored: false }
            }
            Err(error) if persistent => {
                self.refused("store_failed");
                tracing::warn!(%error, client_id = request.client_id, "persistent session refused");
                Decided {
                    decision: ConnectDecision::Refuse(ConnectRefusal::ServerUnavailable),
                    stored: false,
                }
            }
            Err(error) => {
                tracing::warn!(%error, client_id = request.client_id, "clean session accepted without the store");
                clean
            }
        }
    }

    /// Queues a request for the writer, waiting for room.
    async fn send(&self, requests_tx: &flume::Sender<Request>, request: Request) -> Result<(), StoreError> {
        let pending = &self.metrics.mqtt_session_store_pending;
        pending.inc();
        requests_tx.send_async(request).await.map_err(|_| {
            pending.dec();
            StoreError::Stopped
        })
    }

    fn refused(&self, reason: &'static str) {
        self.metrics.mqtt_sessions_refused.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Records that the connection holding `client_id`'s stored session ended, now; with
    /// `expiry_s` (MQTT 5 DISCONNECT, capped here) replacing the granted interval.
    pub async fn disconnected(&self, client_id: String, connection_id: u64, expiry_s: Option<u32>) {
        let Some(requests_tx) = &self.requests_tx else { return };
        let expiry_s = expiry_s.map(|s| s.min(self.max_expiry_s));
        let _ = self.send(requests_tx, Request::Disconnect { client_id, connection_id, expiry_s }).await;
    }

    /// Makes `connection_id` the live connection of `client_id`. A connection that held it
    /// before is told to go ([`Takeover`]).
    pub fn register(&self, client_id: &str, connection_id: u64) -> Arc<Takeover> {
        let takeover = Arc::new(Takeover::default());
        let holder = Holder { connection_id, takeover: Arc::clone(&takeover) };
        let previous =
            self.live.lock().unwrap_or_else(PoisonError::into_inner).insert(client_id.into(), holder);
        if let Some(previous) = previous.filter(|p| p.connection_id != connection_id) {
            self.metrics.mqtt_sessions_taken_over.inc();
            previous.takeover.fire();
        }
        takeover
    }

    /// `connection_id` ended: it no longer holds `client_id` (unless another took it over).
    pub fn unregister(&self, client_id: &str, connection_id: u64) {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        if live.get(client_id).is_some_and(|h| h.connection_id == connection_id) {
            live.remove(client_id);
        }
    }
}

fn protocol_level(version: ProtocolVersion) -> u8 {
    match version {
        ProtocolVersion::V31 => 3,
        ProtocolVersion::V311 => 4,
        ProtocolVersion::V5 => 5,
    }
}

/// Tells a live connection that a newer one took its client id over.
#[derive(Debug, Default)]
pub struct Takeover {
    fired: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Takeover {
    fn fire(&self) {
        self.fired.store(true, Ordering::SeqCst);
        let waker = self.waker.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn poll_fired(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.fired.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        {
            let mut waker = self.waker.lock().unwrap_or_else(PoisonError::into_inner);
            if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *waker = Some(cx.waker().clone());
            }
        }
        // Fired between the check and the registration: do not miss it.
        if self.fired.load(Ordering::SeqCst) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// Completes when `takeover` fires; never without one. Cancel-safe, and a few bytes in the
/// connection's future.
pub fn taken_over(takeover: Option<&Takeover>) -> impl std::future::Future<Output = ()> + Send + '_ {
    std::future::poll_fn(move |cx| match takeover {
        Some(takeover) => takeover.poll_fired(cx),
        None => Poll::Pending,
    })
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The writer thread's state: the only connection to `sessions.db`.
struct Writer {
    conn: Connection,
    max_sessions: u64,
    sweep_every: Duration,
    /// Rows in `mqtt_sessions`, kept in step with each committed transaction.
    stored: u64,
    metrics: Arc<Metrics>,
}

impl Writer {
    fn open(path: &Path, config: &SessionsConfig, metrics: Arc<Metrics>) -> rusqlite::Result<Self> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // A CONNACK saying Session Present = 1 after a power loss must be true.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        let now = now_ms();
        let sweep_every = Duration::from_millis(config.sweep_interval_ms);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Sessions the previous run left connected ended with it (it stopped without their
        // disconnects). Their expiry counts from when it was last known running, plus one sweep
        // interval (it may have run that much longer): late rather than early, never after now.
        let alive: Option<i64> = tx
            .query_row("SELECT value FROM mqtt_sessions_meta WHERE key = ?1", [ALIVE_KEY], |r| r.get(0))
            .optional()?;
        let ended = alive.map_or(now, |alive| {
            now.min(alive.saturating_add(i64::try_from(sweep_every.as_millis()).unwrap_or(i64::MAX)))
        });
        tx.execute(
            "UPDATE mqtt_sessions SET disconnected_ms = ?1, expires_ms = ?1 + expiry_s * 1000,
                connection_id = NULL
             WHERE disconnected_ms IS NULL",
            [ended],
        )?;
        // A lowered max_expiry_s applies to the sessions already stored.
        tx.execute(
            "UPDATE mqtt_sessions SET expiry_s = ?1, expires_ms = disconnected_ms + ?1 * 1000 WHERE expiry_s > ?1",
            [config.max_expiry_s],
        )?;
        let expired = tx.execute("DELETE FROM mqtt_sessions WHERE expires_ms <= ?1", [now])?;
        write_alive(&tx, now)?;
        let stored: i64 = tx.query_row("SELECT count(*) FROM mqtt_sessions", [], |r| r.get(0))?;
        tx.commit()?;
        let stored = u64::try_from(stored).unwrap_or(0);
        metrics.mqtt_sessions.set(i64::try_from(stored).unwrap_or(i64::MAX));
        metrics.mqtt_sessions_expired.inc_by(expired as u64);
        tracing::info!(stored, expired, "MQTT session store opened");
        Ok(Self { conn, max_sessions: config.max_sessions, sweep_every, stored, metrics })
    }

    /// Applies requests in groups until every sender is gone, sweeping expired sessions every
    /// `sweep_every`.
    fn run(mut self, requests_rx: flume::Receiver<Request>) {
        let mut next_sweep = Instant::now() + self.sweep_every;
        let mut group = Vec::new();
        loop {
            match requests_rx.recv_deadline(next_sweep) {
                Ok(request) => group.push(request),
                Err(flume::RecvTimeoutError::Timeout) => {}
                Err(flume::RecvTimeoutError::Disconnected) => break,
            }
            // Everything queued meanwhile (while the last transaction synced) joins this one.
            while group.len() < MAX_GROUP {
                match requests_rx.try_recv() {
                    Ok(request) => group.push(request),
                    Err(_) => break,
                }
            }
            let sweep = Instant::now() >= next_sweep;
            if sweep {
                next_sweep = Instant::now() + self.sweep_every;
            }
            self.commit_group(&mut group, sweep);
        }
        // Stopping cleanly: every connection's end is recorded; note when.
        if let Err(error) = self.conn.execute(
            "INSERT INTO mqtt_sessions_meta (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![ALIVE_KEY, now_ms()],
        ) {
            tracing::warn!(%error, "session store: cannot record the stop time");
        }
        tracing::debug!("MQTT session store closed");
    }

    /// One transaction for `group` (and the sweep, when due); answers each CONNECT after the
    /// commit, or with the error.
    fn commit_group(&mut self, group: &mut Vec<Request>, sweep: bool) {
        let now = now_ms();
        let stored_before = self.stored;
        let started = Instant::now();
        let outcome = self.apply(group, now, sweep);
        self.metrics.mqtt_session_store_pending.dec_by(group.len() as i64);
        match outcome {
            Ok((verdicts, expired)) => {
                let metrics = &self.metrics;
                metrics.mqtt_session_store_transactions.inc();
                metrics.mqtt_session_store_requests.inc_by(group.len() as u64);
                metrics.mqtt_session_store_commit_seconds.observe(started.elapsed().as_secs_f64());
                metrics.mqtt_sessions_expired.inc_by(expired);
                metrics.mqtt_sessions.set(i64::try_from(self.stored).unwrap_or(i64::MAX));
                for (request, verdict) in group.drain(..).zip(verdicts) {
                    if let (Request::Connect { reply, .. }, Some(verdict)) = (request, verdict) {
                        // The connection may be gone (its connect deadline passed).
                        let _ = reply.send(Ok(verdict));
                    }
                }
            }
            Err(error) => {
                // Rolled back: nothing of the group happened.
                self.stored = stored_before;
                self.metrics.mqtt_session_store_errors.inc();
                tracing::error!(%error, requests = group.len(), "session store transaction failed");
                let error = StoreError::Sqlite(error.to_string());
                for request in group.drain(..) {
                    if let Request::Connect { reply, .. } = request {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
            }
        }
    }

    /// Applies `group` in one transaction: a verdict per CONNECT (`None` for the others) and
    /// the number of sessions that expired.
    fn apply(
        &mut self,
        group: &[Request],
        now: i64,
        sweep: bool,
    ) -> rusqlite::Result<(Vec<Option<Verdict>>, u64)> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut verdicts = Vec::with_capacity(group.len());
        let mut expired = 0;
        for request in group {
            match request {
                Request::Connect { record, .. } => {
                    let (verdict, gone) = connect(&tx, record, now, &mut self.stored, self.max_sessions)?;
                    expired += gone;
                    verdicts.push(Some(verdict));
                }
                Request::Disconnect { client_id, connection_id, expiry_s } => {
                    expired += disconnect(&tx, client_id, *connection_id, *expiry_s, now, &mut self.stored)?;
                    verdicts.push(None);
                }
            }
        }
        if sweep {
            let swept = tx.execute("DELETE FROM mqtt_sessions WHERE expires_ms <= ?1", [now])? as u64;
            self.stored = self.stored.saturating_sub(swept);
            expired += swept;
            write_alive(&tx, now)?;
        }
        tx.commit()?;
        Ok((verdicts, expired))
    }
}

fn write_alive(tx: &Transaction<'_>, now: i64) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO mqtt_sessions_meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![ALIVE_KEY, now],
    )?;
    Ok(())
}

/// A CONNECT: resume the stored session (unless expired or Clean Start), and record this one
/// when it is to outlive the connection (or resumes one). Returns the verdict and how many
/// sessions it found expired (0 or 1).
fn connect(
    tx: &Transaction<'_>,
    record: &ConnectRecord,
    now: i64,
    stored: &mut u64,
    max_sessions: u64,
) -> rusqlite::Result<(Verdict, u64)> {
    let existing: Option<Option<i64>> = tx
        .prepare_cached("SELECT expires_ms FROM mqtt_sessions WHERE client_id = ?1")?
        .query_row([&record.client_id], |r| r.get(0))
        .optional()?;
    let mut expired = 0;
    let mut exists = existing.is_some();
    let is_expired = matches!(existing, Some(Some(expires_ms)) if expires_ms <= now);
    if exists && (is_expired || record.clean_start) {
        tx.prepare_cached("DELETE FROM mqtt_sessions WHERE client_id = ?1")?.execute([&record.client_id])?;
        *stored = stored.saturating_sub(1);
        exists = false;
        expired = u64::from(is_expired);
    }
    let present = exists;
    // MQTT 5 Clean Start 0 with expiry 0 resumes a stored session that then ends with the
    // connection: kept (as connected) until then.
    if record.expiry_s == 0 && !present {
        return Ok((Verdict::Accepted { present: false, stored: false }, expired));
    }
    if !exists && *stored >= max_sessions {
        return Ok((Verdict::Full, expired));
    }
    tx.prepare_cached(
        "INSERT INTO mqtt_sessions
            (client_id, protocol_version, expiry_s, created_ms, connected_ms, disconnected_ms, expires_ms,
             connection_id)
         VALUES (?1, ?2, ?3, ?4, ?4, NULL, NULL, ?5)
         ON CONFLICT (client_id) DO UPDATE SET
            protocol_version = excluded.protocol_version, expiry_s = excluded.expiry_s,
            connected_ms = excluded.connected_ms, disconnected_ms = NULL, expires_ms = NULL,
            connection_id = excluded.connection_id",
    )?
    .execute(params![
        record.client_id,
        record.protocol_version,
        record.expiry_s,
        now,
        i64::try_from(record.connection_id).unwrap_or(i64::MAX)
    ])?;
    if !exists {
        *stored += 1;
    }
    Ok((Verdict::Accepted { present, stored: true }, expired))
}

/// The connection holding a stored session ended: its expiry clock starts (an interval of 0
/// ends it now, counted as expired). A connection that no longer holds the session (taken over,
/// or the session was discarded) changes nothing.
fn disconnect(
    tx: &Transaction<'_>,
    client_id: &str,
    connection_id: u64,
    expiry_s: Option<u32>,
    now: i64,
    stored: &mut u64,
) -> rusqlite::Result<u64> {
    let connection_id = i64::try_from(connection_id).unwrap_or(i64::MAX);
    let current: Option<u32> = tx
        .prepare_cached("SELECT expiry_s FROM mqtt_sessions WHERE client_id = ?1 AND connection_id = ?2")?
        .query_row(params![client_id, connection_id], |r| r.get(0))
        .optional()?;
    let Some(current) = current else { return Ok(0) };
    let expiry_s = expiry_s.unwrap_or(current);
    if expiry_s == 0 {
        tx.prepare_cached("DELETE FROM mqtt_sessions WHERE client_id = ?1")?.execute([client_id])?;
        *stored = stored.saturating_sub(1);
        return Ok(1);
    }
    tx.prepare_cached(
        "UPDATE mqtt_sessions SET disconnected_ms = ?2, expiry_s = ?3, expires_ms = ?2 + ?3 * 1000,
            connection_id = NULL
         WHERE client_id = ?1",
    )?
    .execute(params![client_id, now, expiry_s])?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_sessions: u64) -> SessionsConfig {
        SessionsConfig { max_sessions, ..SessionsConfig::default() }
    }

    fn request(
        client_id: &str,
        version: ProtocolVersion,
        clean_start: bool,
        expiry: Option<u32>,
    ) -> ConnectRequest {
        ConnectRequest {
            client_id: client_id.into(),
            assigned: false,
            version,
            clean_start,
            session_expiry_secs: expiry,
            keep_alive_secs: 30,
            username: None,
            password: None,
        }
    }

    fn accepted(present: bool, expiry: u32) -> ConnectDecision {
        ConnectDecision::Accept { session_present: present, session_expiry_secs: expiry }
    }

    #[tokio::test]
    async fn sessions_are_resumed_discarded_and_capped() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let config = SessionsConfig { max_expiry_s: 7200, ..config(10) };
        let (sessions, done) = Sessions::open(dir.path(), &config, Arc::clone(&metrics)).unwrap();
        let v311 = |clean| request("a", ProtocolVersion::V311, clean, None);

        // 3.1.1 Clean Session 0: kept for max_expiry_s.
        let first = sessions.decide(&v311(false), 1).await;
        assert_eq!(first, Decided { decision: accepted(false, 7200), stored: true });
        sessions.disconnected("a".into(), 1, None).await;
        assert_eq!(sessions.decide(&v311(false), 2).await.decision, accepted(true, 7200));
        // Clean Session 1 discards it.
        sessions.disconnected("a".into(), 2, None).await;
        assert_eq!(
            sessions.decide(&v311(true), 3).await,
            Decided { decision: accepted(false, 0), stored: false }
        );
        assert_eq!(sessions.decide(&v311(false), 4).await.decision, accepted(false, 7200));

        // MQTT 5: the asked expiry, capped.
        let v5 = |clean, expiry| request("b", ProtocolVersion::V5, clean, Some(expiry));
        assert_eq!(sessions.decide(&v5(false, u32::MAX), 5).await.decision, accepted(false, 7200));
        sessions.disconnected("b".into(), 5, None).await;
        // Clean Start 0, expiry 0: resumed, and it ends with this connection.
        assert_eq!(
            sessions.decide(&v5(false, 0), 6).await,
            Decided { decision: accepted(true, 0), stored: true }
        );
        sessions.disconnected("b".into(), 6, None).await;
        assert_eq!(sessions.decide(&v5(false, 60), 7).await.decision, accepted(false, 60));
        // A DISCONNECT setting 0 ends it.
        sessions.disconnected("b".into(), 7, Some(0)).await;
        assert_eq!(sessions.decide(&v5(false, 60), 8).await.decision, accepted(false, 60));

        // A connection that lost the session (taken over) does not end it.
        assert_eq!(sessions.decide(&v5(false, 60), 9).await.decision, accepted(true, 60));
        sessions.disconnected("b".into(), 8, None).await;
        sessions.disconnected("b".into(), 9, None).await;
        assert_eq!(sessions.decide(&v5(false, 60), 10).await.decision, accepted(true, 60));

        // An assigned client id never has a session.
        let assigned = ConnectRequest { assigned: true, ..v5(false, 60) };
        assert_eq!(
            sessions.decide(&assigned, 11).await,
            Decided { decision: accepted(false, 0), stored: false }
        );

        drop(sessions);
        done.wait().await;
        assert_eq!(metrics.mqtt_sessions.get(), 2, "a and b");
        assert_eq!(metrics.mqtt_sessions_resumed.get(), 4);
    }

    #[tokio::test]
    async fn over_max_sessions_new_ones_are_refused_and_old_ones_resume() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let (sessions, _done) = Sessions::open(dir.path(), &config(2), Arc::clone(&metrics)).unwrap();
        for (n, id) in ["a", "b"].into_iter().enumerate() {
            let decided = sessions.decide(&request(id, ProtocolVersion::V5, false, Some(60)), n as u64).await;
            assert_eq!(decided.decision, accepted(false, 60));
        }
        let full = sessions.decide(&request("c", ProtocolVersion::V5, false, Some(60)), 3).await;
        assert_eq!(full.decision, ConnectDecision::Refuse(ConnectRefusal::QuotaExceeded));
        // Clean sessions need no room; stored ones resume.
        let clean = sessions.decide(&request("c", ProtocolVersion::V311, true, None), 4).await;
        assert_eq!(clean.decision, accepted(false, 0));
        let again = sessions.decide(&request("a", ProtocolVersion::V5, false, Some(60)), 5).await;
        assert_eq!(again.decision, accepted(true, 60));
        let text = metrics.encode();
        assert!(text.contains("weir_mqtt_sessions_refused_total{reason=\"max_sessions\"} 1"), "{text}");
    }

    #[tokio::test]
    async fn concurrent_connects_share_transactions() {
        const DEVICES: u64 = 500;
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let (sessions, done) = Sessions::open(dir.path(), &config(1000), Arc::clone(&metrics)).unwrap();
        // Another connection holds the write lock (as a slow disk would hold the writer), so
        // that every connect is queued before the first transaction can commit.
        let lock = Connection::open(dir.path().join(SESSIONS_FILE)).unwrap();
        lock.execute_batch("BEGIN IMMEDIATE").unwrap();
        let connects: Vec<_> = (0..DEVICES)
            .map(|n| {
                let sessions = Arc::clone(&sessions);
                tokio::spawn(async move {
                    let request = request(&format!("dev-{n}"), ProtocolVersion::V5, false, Some(60));
                    sessions.decide(&request, n).await
                })
            })
            .collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
        while metrics.mqtt_session_store_pending.get() < DEVICES as i64 {
            assert!(tokio::time::Instant::now() < deadline, "every connect is queued");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(metrics.mqtt_session_store_transactions.get(), 0, "none committed yet");
        lock.execute_batch("COMMIT").unwrap();
        for connect in connects {
            assert_eq!(connect.await.unwrap().decision, accepted(false, 60));
        }
        drop(sessions);
        done.wait().await;
        let transactions = metrics.mqtt_session_store_transactions.get();
        assert_eq!(metrics.mqtt_session_store_requests.get(), DEVICES);
        // The one the writer had taken before it met the lock, then all the others.
        assert!(transactions <= 2, "{transactions} transactions for {DEVICES} connects");
        assert_eq!(metrics.mqtt_session_store_pending.get(), 0);
        assert_eq!(metrics.mqtt_sessions.get(), DEVICES as i64);
    }

    #[tokio::test]
    async fn the_live_connection_of_a_client_id_is_taken_over() {
        let sessions = Sessions::without_store(Arc::new(Metrics::new()));
        let first = sessions.register("dev", 1);
        let waiting = tokio::spawn({
            let first = Arc::clone(&first);
            async move { taken_over(Some(&first)).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        let second = sessions.register("dev", 2);
        tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap();
        // The first one's end does not unregister the second.
        sessions.unregister("dev", 1);
        let _third = sessions.register("dev", 3);
        assert!(second.fired.load(Ordering::SeqCst));
        assert_eq!(sessions.metrics.mqtt_sessions_taken_over.get(), 2);
    }
}
