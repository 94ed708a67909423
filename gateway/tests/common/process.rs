//! Real `weir` processes for the integration tests that need one (or several) to crash: this
//! build's binary run as a child with its own config, data directory and log, started and
//! awaited on `/healthz`, SIGKILLed or SIGTERMed, read through `/metrics`; plus loading it with
//! weir-load's devices and reading back what its sink holds.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use weir_load::flood::{FloodParams, FloodWatch};
use weir_load::verify::{Found, Verdict};
use weir_load::FloodReport;

use super::kafka::brokers;

// ---------------------------------------------------------------------------------------------
// A real weir process
// ---------------------------------------------------------------------------------------------

/// One weir configuration run as a child process, restartable on the same data directory and
/// the same ports (port 0 would move the devices' target at every restart). Its stdout and
/// stderr go to `weir.log` in the data directory, appended across restarts.
pub struct WeirProcess {
    /// This case's own link to (or copy of) the binary under test, so a build that replaces
    /// target/debug/weir mid-case cannot make a restart run other code.
    binary: PathBuf,
    pub data_dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    pub mqtt: SocketAddr,
    pub ops: SocketAddr,
    child: Option<Child>,
    starts: u32,
}

impl WeirProcess {
    /// Writes the config: the ops and MQTT listeners on free loopback ports, MQTT acks at
    /// `ack` (plus `listener`, more keys of the MQTT listener), then `sections` (sink, buffer).
    pub fn new(data_dir: &Path, ack: &str, listener: &str, sections: &str) -> Self {
        let (mqtt, ops) = (free_port(), free_port());
        let config = data_dir.join("weir.toml");
        let text = format!(
            "data_dir = {:?}\n\n[ops]\nlisten = \"{ops}\"\n\n[[listeners]]\nprotocol = \"mqtt\"\n\
             listen = \"{mqtt}\"\nack = \"{ack}\"\n{listener}\n{sections}",
            data_dir.display().to_string()
        );
        fs::write(&config, text).unwrap();
        let binary = data_dir.join("weir-under-test");
        if fs::hard_link(env!("CARGO_BIN_EXE_weir"), &binary).is_err() {
            fs::copy(env!("CARGO_BIN_EXE_weir"), &binary).unwrap();
        }
        WeirProcess {
            binary,
            data_dir: data_dir.to_path_buf(),
            config,
            log: data_dir.join("weir.log"),
            mqtt,
            ops,
            child: None,
            starts: 0,
        }
    }

    /// Starts weir and waits until `/healthz` answers; panics (with the log's tail) if the
    /// process exits first or does not answer within 60 s.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "weir is already running");
        self.starts += 1;
        let mut log = OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        writeln!(log, "==== {}.rs: start #{} ====", env!("CARGO_CRATE_NAME"), self.starts).unwrap();
        let child = Command::new(&self.binary)
            .args(["run", "--config"])
            .arg(&self.config)
            .env("WEIR_LOG", "info")
            .env("WEIR_LOG_FORMAT", "text")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let began = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!("weir exited during start #{}: {status}\n{}", self.starts, self.log_tail(40));
            }
            if self.healthy() {
                return;
            }
            assert!(
                began.elapsed() < Duration::from_secs(60),
                "weir did not answer /healthz within 60 s\n{}",
                self.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no shutdown, no flush; what weir had not made durable is gone.
    pub fn sigkill(&mut self) {
        let mut child = self.child.take().expect("weir is running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM, and waits (up to 60 s) for the clean exit weir promises after its grace period.
    pub async fn terminate(&mut self) {
        let mut child = self.child.take().expect("weir is running");
        let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        assert!(status.success());
        let began = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "weir exited with {status} after SIGTERM\n{}", self.log_tail(40));
                return;
            }
            if began.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("weir still running 60 s after SIGTERM\n{}", self.log_tail(40));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// True while the process runs (not exited, not killed by the test).
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    pub fn healthy(&self) -> bool {
        http_get(self.ops, "/healthz").is_some_and(|(status, _)| status == 200)
    }

    /// The `/metrics` text; panics if weir does not answer.
    pub fn metrics(&self) -> String {
        match http_get(self.ops, "/metrics") {
            Some((200, body)) => body,
            other => panic!("GET /metrics: {other:?}\n{}", self.log_tail(40)),
        }
    }

    /// Sum of every sample of `name` (all label sets).
    pub fn metric(&self, name: &str) -> u64 {
        super::metric_value(&self.metrics(), name)
    }

    /// The sample of `name` with exactly the labels `labels` (e.g. `reason="disk_full"`).
    pub fn labelled(&self, name: &str, labels: &str) -> u64 {
        let prefix = format!("{name}{{{labels}}} ");
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(&prefix)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn buffer_dir(&self) -> PathBuf {
        self.data_dir.join("buffer")
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("telemetry.db")
    }
}

impl Drop for WeirProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A loopback port free now; weir binds it at every restart (listeners set SO_REUSEADDR).
pub fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// `GET path` over HTTP/1.1; `None` when nothing answers.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: weir\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body).to_owned();
    Some((status, body))
}

// ---------------------------------------------------------------------------------------------
// Configs, load, read-back
// ---------------------------------------------------------------------------------------------

/// The `[sink]` section writing every record to `topic` (created with `partitions` if missing),
/// dead letters to `{topic}-dl`.
pub fn kafka_sink(topic: &str, partitions: u32) -> String {
    format!(
        "[sink]\nkind = \"kafka\"\nbrokers = \"{}\"\ntopic = \"{topic}\"\ndead_letter_topic = \"{topic}-dl\"\n\
         topic_partitions = {partitions}\n",
        brokers()
    )
}

pub fn start_flood(params: FloodParams) -> (FloodWatch, JoinHandle<FloodReport>) {
    let watch = FloodWatch::default();
    let run = weir_load::flood::run_watched(params, watch.clone());
    (watch, tokio::spawn(async move { run.await.expect("flood ran") }))
}

/// Polls `check` every 50 ms until it is true or `within` passes; returns the last result.
pub async fn wait_for(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the sink has committed everything weir holds: the buffer's backlog is 0.
pub async fn wait_backlog_drained(weir: &WeirProcess, within: Duration) -> Duration {
    let began = Instant::now();
    assert!(
        wait_for(within, || weir.metric("weir_buffer_unacked_records") == 0).await,
        "the buffer did not drain within {within:?}: {} unacked\n{}",
        weir.metric("weir_buffer_unacked_records"),
        weir.log_tail(30)
    );
    began.elapsed()
}

/// Every message of `topic`, read back by weir-load's verifier (idle 5 s).
pub async fn read_kafka(topic: &str) -> Found {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        weir_load::verify::kafka::consume_blocking(&brokers(), &topic, Duration::from_secs(5))
    })
    .await
    .unwrap()
    .expect("topic read back")
}

/// Every row of weir's SQLite table in `db`, read back by weir-load's verifier.
pub async fn read_sqlite(db: PathBuf) -> Found {
    tokio::task::spawn_blocking(move || weir_load::verify::sqlite::read(&db, "telemetry"))
        .await
        .unwrap()
        .expect("table read back")
}

/// The devices that lost records (at most 5), with the lost seq ranges, for an assert message.
pub fn explain_loss(verdict: &Verdict) -> String {
    verdict
        .lossy_devices(5)
        .map(|d| format!("{} lost {} {:?}", d.device_id, d.lost, d.lost_ranges))
        .collect::<Vec<_>>()
        .join("; ")
}
