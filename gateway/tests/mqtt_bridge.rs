//! Bridge mode against a real Mosquitto: weir subscribes with a persistent session and acks
//! upstream only after its commits, so a stalled sink, a stopped weir or a restarted broker
//! lose nothing. The shared broker is deploy/local/mosquitto.sh's (127.0.0.1:1884, or
//! WEIR_TEST_MOSQUITTO_PORT); the restart test runs a private broker of its own.
//!
//! Without a reachable broker the tests are skipped with a message, unless CI is set: then
//! they fail.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{count, eventually, metric_value, WriteLock};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use weir::config::Config;
use weir::Gateway;

const WAIT: Duration = Duration::from_secs(30);

/// The shared broker's port, or `None` (after saying why) when the test should be skipped.
async fn shared_broker() -> Option<u16> {
    init_logs();
    let port = std::env::var("WEIR_TEST_MOSQUITTO_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(1884);
    let reachable =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(("127.0.0.1", port)))
            .await
            .is_ok_and(|c| c.is_ok());
    if reachable {
        return Some(port);
    }
    let message = format!(
        "Mosquitto is not reachable on 127.0.0.1:{port}; start it with deploy/local/mosquitto.sh start"
    );
    if std::env::var_os("CI").is_some() {
        panic!("{message} (CI is set, so this test must run)");
    }
    eprintln!("SKIPPED: {message}");
    None
}

/// Logs to the test output with RUST_LOG (e.g. `RUST_LOG=weir=debug`).
fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A name no other test (or earlier run) uses: topics and client ids stay apart.
fn unique(name: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

/// The bridge listener's TOML.
fn bridge_toml(port: u16, client_id: &str, filter: &str, extra: &str) -> String {
    format!(
        "[[listeners]]\nprotocol = \"mqtt_bridge\"\nbroker = \"127.0.0.1:{port}\"\nclient_id = \"{client_id}\"\n\
         filters = [\"{filter}\"]\ndevice_id_topic_level = 2\n{extra}"
    )
}

/// Starts a gateway whose data lives in `dir` (kept across restarts).
async fn start_gateway(dir: &Path, listeners_toml: &str, extra: &str) -> Gateway {
    let text = format!(
        "data_dir = {:?}\n{listeners_toml}\n[ops]\nlisten = \"127.0.0.1:0\"\n{extra}",
        dir.display().to_string()
    );
    weir::start(Config::parse(&text, "bridge-test.toml").unwrap()).await.unwrap()
}

fn metric(gateway: &Gateway, name: &str) -> u64 {
    metric_value(&gateway.metrics().encode(), name)
}

/// One labelled sample, e.g. `weir_protocol_errors_total{protocol="mqtt_bridge",reason="x"}`.
fn labelled(gateway: &Gateway, name: &str, labels: &str) -> u64 {
    let text = gateway.metrics().encode();
    let prefix = format!("{name}{{{labels}}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).map_or(0, |v| v.parse::<f64>().unwrap() as u64)
}

fn received(gateway: &Gateway) -> u64 {
    labelled(gateway, "weir_messages_received_total", "protocol=\"mqtt_bridge\"")
}

fn db(dir: &Path) -> PathBuf {
    dir.join("telemetry.db")
}

/// Connects as `client_id` with a persistent session and subscribes `filter` with QoS 1, so
/// the broker queues messages for weir from now on, before weir ever connected.
async fn prepare_session(port: u16, client_id: &str, filter: &str) {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_clean_session(false).set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 8);
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await.unwrap() {
                break;
            }
        }
    })
    .await
    .expect("no SUBACK");
    client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
}

/// Publishes every `(topic, payload)` with QoS 1 and returns once the broker acked them all.
async fn publish_all(port: u16, messages: Vec<(String, String)>) {
    let mut options = MqttOptions::new(unique("publisher"), "127.0.0.1", port);
    options.set_clean_session(true).set_keep_alive(Duration::from_secs(30)).set_inflight(100);
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let total = messages.len();
    let publisher = tokio::spawn(async move {
        for (topic, payload) in messages {
            client.publish(topic, QoS::AtLeastOnce, false, payload).await.unwrap();
        }
        client
    });
    let mut acked = 0;
    while acked < total {
        let event = tokio::time::timeout(WAIT, eventloop.poll()).await.expect("publisher stalled");
        if let Event::Incoming(Packet::PubAck(_)) = event.expect("publisher connection failed") {
            acked += 1;
        }
    }
    let client = publisher.await.unwrap();
    client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
}

/// Messages a persistent session `client_id` still holds: connects as it and counts what the
/// broker delivers within `wait` (without acking anything).
async fn undelivered(port: u16, client_id: &str, wait: Duration) -> usize {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_clean_session(false).set_manual_acks(true);
    let (_client, mut eventloop) = AsyncClient::new(options, 8);
    let mut publishes = 0;
    let _ = tokio::time::timeout(wait, async {
        loop {
            if let Event::Incoming(Packet::Publish(_)) = eventloop.poll().await.unwrap() {
                publishes += 1;
            }
        }
    })
    .await;
    publishes
}

/// A reading; devices below `dev-2` are named by the topic, the others by the payload (whose
/// name wins over the topic's `gw` level).
fn message(prefix: &str, device: usize, seq: u64) -> (String, String) {
    let metrics = format!(r#"{{"temp":{},"n":{seq}}}"#, seq as f64 * 0.25);
    if device < 2 {
        (format!("{prefix}/dev-{device}/t"), format!(r#"{{"seq":{seq},"metrics":{metrics}}}"#))
    } else {
        (
            format!("{prefix}/gw/t"),
            format!(r#"{{"device_id":"dev-{device}","seq":{seq},"metrics":{metrics}}}"#),
        )
    }
}

/// `(device_id, seq) -> metrics` as stored, or as expected for `messages`.
type Stored = BTreeMap<(String, i64), serde_json::Value>;

fn stored(db: &Path, device_prefix: &str) -> Stored {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt =
        conn.prepare("SELECT device_id, seq, metrics FROM telemetry WHERE device_id LIKE ?1 || '%'").unwrap();
    stmt.query_map([device_prefix], |r| {
        let metrics: String = r.get(2)?;
        Ok(((r.get(0)?, r.get(1)?), serde_json::from_str(&metrics).unwrap()))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

fn expected(devices: usize, seqs: std::ops::Range<u64>) -> Stored {
    let mut out = Stored::new();
    for device in 0..devices {
        for seq in seqs.clone() {
            // weir stores JSON numbers as floating point.
            let metrics = serde_json::json!({ "temp": seq as f64 * 0.25, "n": seq as f64 });
            out.insert((format!("dev-{device}"), seq as i64), metrics);
        }
    }
    out
}

/// Compares stored rows with the expected ones, reporting the first differences briefly.
fn assert_stored(actual: &Stored, expected: &Stored, what: &str) {
    if actual == expected {
        return;
    }
    let missing: Vec<_> = expected.keys().filter(|k| !actual.contains_key(*k)).take(5).collect();
    let extra: Vec<_> = actual.keys().filter(|k| !expected.contains_key(*k)).take(5).collect();
    let changed: Vec<_> =
        expected.iter().filter(|(k, v)| actual.get(*k).is_some_and(|a| a != *v)).take(5).collect();
    panic!(
        "{what}: {} rows stored, {} expected; missing {missing:?}, unexpected {extra:?}, \
         different {changed:?}",
        actual.len(),
        expected.len()
    );
}

fn telemetry_rows(db: &Path) -> i64 {
    count(db, "SELECT COUNT(*) FROM telemetry")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_sink_holds_the_messages_in_the_broker_and_all_arrive_once_released() {
    let Some(port) = shared_broker().await else { return };
    let id = unique("bridge-stall");
    let prefix = format!("weir-test/{id}");
    let filter = format!("{prefix}/#");
    prepare_session(port, &id, &filter).await;
    let dir = tempfile::tempdir().unwrap();
    let gateway =
        start_gateway(dir.path(), &bridge_toml(port, &id, &filter, "max_inflight = 100\n"), "").await;
    let lock = WriteLock::take(&db(dir.path()));

    let messages: Vec<_> = (0..4).flat_map(|d| (1..=500).map(move |s| (d, s))).collect();
    publish_all(port, messages.into_iter().map(|(d, s)| message(&prefix, d, s)).collect()).await;
    assert!(
        eventually(WAIT, || received(&gateway) == 100).await,
        "weir takes exactly max_inflight messages while the sink is stalled (took {})",
        received(&gateway)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(received(&gateway), 100, "no more than max_inflight are taken from the broker");
    assert_eq!(telemetry_rows(&db(dir.path())), 0, "nothing is committed while the sink is stalled");

    lock.release();
    assert!(
        eventually(WAIT, || telemetry_rows(&db(dir.path())) == 2000).await,
        "rows: {}",
        telemetry_rows(&db(dir.path()))
    );
    assert_stored(
        &stored(&db(dir.path()), "dev-"),
        &expected(4, 1..501),
        "every message exactly as published",
    );
    assert_eq!(received(&gateway), 2000, "each message was received once");
    assert_eq!(metric(&gateway, "weir_records_duplicate_total"), 0);
    assert_eq!(labelled(&gateway, "weir_connections_active", "protocol=\"mqtt_bridge\""), 1);

    let report = gateway.shutdown().await;
    assert!(report.clean);
    assert_eq!(
        undelivered(port, &id, Duration::from_secs(1)).await,
        0,
        "every message was acked upstream: the session holds nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_stopped_before_its_commits_gets_everything_again_from_the_broker() {
    let Some(port) = shared_broker().await else { return };
    let id = unique("bridge-restart");
    let prefix = format!("weir-test/{id}");
    let filter = format!("{prefix}/#");
    prepare_session(port, &id, &filter).await;
    let dir = tempfile::tempdir().unwrap();
    let listener = bridge_toml(port, &id, &filter, "max_inflight = 50\n");
    let short_grace = "[shutdown]\ngrace_ms = 300\n";

    let first = start_gateway(dir.path(), &listener, short_grace).await;
    publish_all(port, (1..=100).map(|s| message(&prefix, 0, s)).collect()).await;
    assert!(eventually(WAIT, || telemetry_rows(&db(dir.path())) == 100).await);

    let lock = WriteLock::take(&db(dir.path()));
    publish_all(port, (101..=400).map(|s| message(&prefix, 0, s)).collect()).await;
    assert!(eventually(WAIT, || received(&first) == 150).await, "received {}", received(&first));
    let report = first.shutdown().await;
    assert!(!report.clean, "the stalled sink cannot commit within the grace period");
    lock.release();
    assert_eq!(telemetry_rows(&db(dir.path())), 100, "nothing after the stall was committed");

    let second = start_gateway(dir.path(), &listener, short_grace).await;
    assert!(
        eventually(WAIT, || telemetry_rows(&db(dir.path())) == 400).await,
        "rows: {}",
        telemetry_rows(&db(dir.path()))
    );
    assert_stored(&stored(&db(dir.path()), "dev-"), &expected(1, 1..401), "after the restart");
    assert_eq!(received(&second), 300, "the broker redelivered exactly what was not acked");
    assert!(second.shutdown().await.clean);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_and_oversized_messages_are_dead_lettered_and_acked_upstream() {
    let Some(port) = shared_broker().await else { return };
    let id = unique("bridge-dead");
    let prefix = format!("weir-test/{id}");
    let filter = format!("{prefix}/#");
    prepare_session(port, &id, &filter).await;
    let dir = tempfile::tempdir().unwrap();
    let listener = bridge_toml(port, &id, &filter, "max_packet_bytes = 1024\n");
    let gateway = start_gateway(dir.path(), &listener, "").await;

    // A stock client publishes: garbage, a reading, an oversized reading, a reading.
    let topic = format!("{prefix}/dev-bad/t");
    let big = format!(r#"{{"seq":99,"metrics":{{"pad":"{}"}}}}"#, "x".repeat(4000));
    let payloads = [
        "this is not json".to_string(),
        r#"{"seq":1,"metrics":{"t":1}}"#.into(),
        big,
        r#"{"seq":2,"metrics":{"t":2}}"#.into(),
    ];
    for payload in &payloads {
        let status = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-t", &topic, "-m", payload])
            .status()
            .expect("mosquitto_pub (deploy/local/install-deps.sh installs it)");
        assert!(status.success());
    }
    let path = db(dir.path());
    assert!(
        eventually(WAIT, || telemetry_rows(&path) == 2
            && count(&path, "SELECT COUNT(*) FROM dead_letter") == 2)
        .await
    );
    let conn = rusqlite::Connection::open(&path).unwrap();
    let letters: Vec<(String, String, String, Vec<u8>)> = conn
        .prepare("SELECT device_id, source, error, raw FROM dead_letter ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!((letters[0].0.as_str(), letters[0].1.as_str()), ("dev-bad", topic.as_str()));
    assert_eq!(letters[0].3, b"this is not json");
    assert_eq!((letters[1].0.as_str(), letters[1].3.len()), ("dev-bad", 0));
    assert!(letters[1].2.contains("max_packet_bytes"), "{}", letters[1].2);
    assert_eq!(common::rows(&path), [("dev-bad".to_string(), 1), ("dev-bad".to_string(), 2)]);
    assert_eq!(received(&gateway), 4);
    assert!(gateway.shutdown().await.clean);

    // Started again on the same session: the broker has nothing to redeliver.
    let again = start_gateway(dir.path(), &listener, "").await;
    assert!(
        eventually(WAIT, || labelled(&again, "weir_connections_active", "protocol=\"mqtt_bridge\"") == 1)
            .await
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(received(&again), 0, "the dead-lettered messages were acked, not redelivered");
    publish_all(port, vec![(topic.clone(), r#"{"seq":3,"metrics":{"t":3}}"#.into())]).await;
    assert!(eventually(WAIT, || telemetry_rows(&path) == 3).await);
    assert_eq!(count(&path, "SELECT COUNT(*) FROM dead_letter"), 2);
    assert!(again.shutdown().await.clean);
}

/// A Mosquitto of the test's own, on a free port, with persistence, so it can be stopped and
/// restarted without disturbing the shared broker.
struct PrivateBroker {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl PrivateBroker {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout).unwrap();
        let config = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nuser {}\npersistence true\n\
             persistence_location {}/\nmax_queued_messages 1000000\nmax_inflight_messages 0\n\
             log_dest file {}/mosquitto.log\n",
            user.trim(),
            dir.path().display(),
            dir.path().display()
        );
        std::fs::write(dir.path().join("mosquitto.conf"), config).unwrap();
        Self { dir, port, child: None }
    }

    async fn start(&mut self) {
        let binary = ["/usr/sbin/mosquitto", "mosquitto"]
            .into_iter()
            .find(|b| Command::new(b).arg("-h").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok())
            .expect("mosquitto is not installed (deploy/local/install-deps.sh installs it)");
        let child = Command::new(binary)
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let port = self.port;
        let up =
            eventually(Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
                .await;
        assert!(up, "the private mosquitto did not start on {port}");
    }

    /// SIGTERM: Mosquitto saves its sessions and queued messages, then exits.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_at_start_and_restarted_mid_stream_weir_reconnects_and_loses_nothing() {
    if shared_broker().await.is_none() {
        return;
    }
    let mut broker = PrivateBroker::new();
    let port = broker.port;
    let id = unique("bridge-broker-restart");
    let prefix = format!("weir-test/{id}");
    let filter = format!("{prefix}/#");
    let dir = tempfile::tempdir().unwrap();
    let listener = bridge_toml(
        port,
        &id,
        &filter,
        "max_inflight = 50\nreconnect_min_ms = 50\nreconnect_max_ms = 400\nkeepalive_s = 2\n",
    );
    let gateway = start_gateway(dir.path(), &listener, "").await;
    let failures = |g: &Gateway| {
        labelled(g, "weir_protocol_errors_total", "protocol=\"mqtt_bridge\",reason=\"connect_failed\"")
    };

    // Broker down at start: retries back off instead of spinning.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let early = failures(&gateway);
    assert!((3..=20).contains(&early), "{early} connection attempts in 1.5 s with backoff 50..400 ms");

    broker.start().await;
    assert!(
        eventually(WAIT, || labelled(&gateway, "weir_connections_active", "protocol=\"mqtt_bridge\"") == 1)
            .await
    );
    // weir made the session and subscribed itself; probe until its subscription delivers.
    let mut probe = 0;
    while received(&gateway) == 0 {
        probe += 1;
        assert!(probe < 100, "the bridge never received a probe");
        publish_all(port, vec![(format!("{prefix}/probe/t"), format!(r#"{{"seq":{probe}}}"#))]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    publish_all(port, (1..=200).map(|s| message(&prefix, 0, s)).collect()).await;
    let path = db(dir.path());
    assert!(eventually(WAIT, || stored(&path, "dev-").len() == 200).await);

    // Stall the sink so messages are in flight in weir, then restart the broker under it.
    let lock = WriteLock::take(&path);
    let before = received(&gateway);
    publish_all(port, (201..=400).map(|s| message(&prefix, 0, s)).collect()).await;
    assert!(eventually(WAIT, || received(&gateway) == before + 50).await);
    broker.stop();
    let failed_before_restart = failures(&gateway);
    assert!(
        eventually(WAIT, || failures(&gateway) > failed_before_restart).await,
        "weir retries while the broker is down"
    );
    broker.start().await;
    assert!(
        eventually(WAIT, || labelled(&gateway, "weir_connections_opened_total", "protocol=\"mqtt_bridge\"")
            >= 2)
        .await
    );
    // The broker kept the session: it redelivers the 50 taken before the restart and the rest.
    lock.release();
    publish_all(port, (401..=500).map(|s| message(&prefix, 0, s)).collect()).await;
    assert!(
        eventually(WAIT, || stored(&path, "dev-").len() == 500).await,
        "rows: {}",
        stored(&path, "dev-").len()
    );
    assert_stored(&stored(&path, "dev-"), &expected(1, 1..501), "every message exactly once");
    let duplicates = metric(&gateway, "weir_records_duplicate_total");
    eprintln!(
        "broker restart: {} connection attempts failed, {duplicates} redelivered duplicates absorbed",
        failures(&gateway)
    );
    assert!(duplicates >= 50, "the 50 messages in flight at the restart were redelivered ({duplicates})");
    assert!(gateway.shutdown().await.clean);
    broker.stop();
}

/// Throughput of the bridge draining a backlog: 20 000 messages wait in the broker (the sink is
/// stalled while they are published), then the sink is released and the time until every row
/// is committed (and acked) is measured. Run with
/// `cargo test --release -p weir --test mqtt_bridge -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a check"]
async fn backlog_drain_throughput() {
    let Some(port) = shared_broker().await else { return };
    let id = unique("bridge-throughput");
    let prefix = format!("weir-test/{id}");
    let filter = format!("{prefix}/#");
    prepare_session(port, &id, &filter).await;
    let dir = tempfile::tempdir().unwrap();
    let gateway = start_gateway(dir.path(), &bridge_toml(port, &id, &filter, ""), "").await;
    let path = db(dir.path());
    let lock = WriteLock::take(&path);
    let total = 20_000u64;
    let messages = (0..8).flat_map(|d| (1..=total / 8).map(move |s| (d, s)));
    publish_all(port, messages.map(|(d, s)| message(&prefix, d, s)).collect()).await;
    let started = std::time::Instant::now();
    lock.release();
    assert!(eventually(Duration::from_secs(120), || telemetry_rows(&path) == total as i64).await);
    let elapsed = started.elapsed();
    assert!(eventually(WAIT, || all_committed(&gateway)).await);
    eprintln!(
        "bridge backlog drain: {total} messages in {:.2} s = {:.0} msg/s (max_inflight 1000, SQLite sink)",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    assert!(gateway.shutdown().await.clean);
}

/// True once every message the bridge received has its record committed.
fn all_committed(gateway: &Gateway) -> bool {
    received(gateway) == metric(gateway, "weir_records_committed_total")
}
