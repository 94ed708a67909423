//! The ops listener's device APIs and the dashboard page, the latter in a real browser: headless
//! Chromium (Debian's `chromium`, installed by deploy/local/install-deps.sh) driven over the
//! DevTools protocol. The page must load without a console error, its charts must move while
//! devices publish, and its device table must show those devices with their flags.
//!
//! `WEIR_DASHBOARD_SCREENSHOT=docs/dashboard.png cargo test -p weir --test dashboard` also saves
//! a screenshot of the page under that load.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use weir_protocols::mqtt::{Packet, QoS};

/// GET over plain HTTP/1.1; the status and the body (by Content-Length: Chromium's DevTools
/// server keeps the connection open whatever the request says).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let read = async {
        loop {
            let mut chunk = [0u8; 16 * 1024];
            let n = stream.read(&mut chunk).await.unwrap();
            response.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&response);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")))
                    .and_then(|(_, v)| v.trim().parse::<usize>().ok());
                if n == 0 || length.is_some_and(|len| body.len() >= len) {
                    return;
                }
            } else if n == 0 {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read).await.expect("an HTTP answer within 30 s");
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    (status, body)
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Publishes `payloads` as QoS 1 from one MQTT device and waits for every PUBACK.
async fn publish_all(addr: SocketAddr, client_id: &str, payloads: &[String]) {
    let mut device = RawClient::connect(addr, client_id).await;
    for (i, payload) in payloads.iter().enumerate() {
        let pkid = u16::try_from(i + 1).unwrap();
        device.send(&publish(QoS::AtLeastOnce, pkid, &format!("devices/{client_id}"), payload.clone())).await;
        assert_eq!(device.recv().await, Some(Packet::PubAck(pkid)), "{client_id} message {pkid}");
    }
}

/// What `/api/devices` says about one device.
async fn device(ops: SocketAddr, id: &str) -> Value {
    let (status, body) = get(ops, &format!("/api/devices?device={id}")).await;
    assert_eq!(status, 200, "{body}");
    let page: Value = serde_json::from_str(&body).unwrap();
    let found: Vec<&Value> =
        page["devices"].as_array().unwrap().iter().filter(|d| d["device_id"] == id).collect();
    assert_eq!(found.len(), 1, "{id} in {body}");
    found[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_devices_tells_what_each_device_is_doing() {
    let gw = TestGateway::start("").await;
    let (mqtt, ops) = (gw.mqtt_addr(), gw.gateway.ops_addr());
    let now = now_ms();
    let reading =
        |seq: u64, metrics: &str, ts: i64| format!(r#"{{"seq":{seq},"ts":{ts},"metrics":{{{metrics}}}}}"#);

    // In order and on time.
    let steady: Vec<String> = (1..=5).map(|s| reading(s, r#""temp":20"#, now)).collect();
    publish_all(mqtt, "steady", &steady).await;
    // 3 and 4 never sent, 2 sent twice, 6 after 7.
    let gappy: Vec<String> =
        [1, 2, 2, 5, 7, 6].into_iter().map(|s| reading(s, r#""temp":20"#, now)).collect();
    publish_all(mqtt, "gappy", &gappy).await;
    // A firmware update adds a metric and turns one into text.
    let changing = vec![
        reading(1, r#""temp":20,"rpm":900"#, now),
        reading(2, r#""rpm":910,"temp":21"#, now),
        reading(3, r#""temp":"21.5","rpm":920,"vibration":0.2"#, now),
    ];
    publish_all(mqtt, "changing", &changing).await;
    // A clock two hours behind.
    publish_all(mqtt, "skewed", &[reading(1, r#""temp":20"#, now - 7_200_000)]).await;
    // Not JSON at all.
    publish_all(mqtt, "broken", &["{not json".to_string()]).await;

    // Every message was acknowledged after its commit, and observed before it went to the sink.
    let steady = device(ops, "steady").await;
    assert_eq!((steady["messages"].as_u64(), steady["records"].as_u64()), (Some(5), Some(5)));
    assert_eq!(steady["seq"]["highest"], 5);
    assert_eq!(steady["seq"]["gaps"], 0);
    assert_eq!(steady["format"], "json");
    assert_eq!(steady["protocol"], "mqtt");
    assert_eq!(steady["source"], "devices/steady");
    assert_eq!(
        steady["flags"],
        json!({"silent": false, "gaps": false, "schema_changed": false, "skewed": false, "dead_letters": false})
    );

    let gappy = device(ops, "gappy").await;
    assert_eq!(gappy["seq"], json!({"highest": 7, "gaps": 2, "duplicates": 1, "reorders": 1, "restarts": 0}));
    assert_eq!(gappy["flags"]["gaps"], true);

    let changing = device(ops, "changing").await;
    // Reordering metrics is no change; adding one and changing a value's kind is one.
    assert_eq!(changing["schema_changes"], 1);
    assert_eq!(changing["flags"]["schema_changed"], true);

    let skewed = device(ops, "skewed").await;
    let skew = skewed["clock_skew_ms"].as_f64().unwrap();
    assert!((7_190_000.0..7_300_000.0).contains(&skew), "{skewed}");
    assert_eq!(skewed["flags"]["skewed"], true);

    let broken = device(ops, "broken").await;
    assert_eq!((broken["dead_letters"].as_u64(), broken["records"].as_u64()), (Some(1), Some(0)));
    assert!(broken["last_error"].as_str().is_some_and(|e| !e.is_empty()), "{broken}");

    // Filters, sorting, paging, and bad parameters.
    let (_, body) = get(ops, "/api/devices?filter=gaps").await;
    let page: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page["total"], 1);
    assert_eq!(page["tracked"], 5);
    let (_, body) = get(ops, "/api/devices?sort=messages&order=desc&limit=2&offset=0").await;
    let page: Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> =
        page["devices"].as_array().unwrap().iter().map(|d| d["device_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["gappy", "steady"]);
    let (status, body) = get(ops, "/api/devices?sort=colour").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("sort"), "{body}");

    // The fleet gauges follow within their refresh period.
    assert!(
        eventually(Duration::from_secs(10), || gw.metric("weir_devices") == 5).await,
        "weir_devices = {}",
        gw.metric("weir_devices")
    );
    // Skipped when seen: 3 and 4 (at 5), 6 (at 7); 6 then came late (a reorder). A counter
    // cannot go back: still missing = skipped - late.
    assert_eq!(gw.metric("weir_device_seq_missing_total"), 3);
    assert_eq!(gw.metric("weir_device_reorders_total"), 1);
    assert_eq!(gw.metric("weir_device_schema_changes_total"), 1);

    let (status, body) = get(ops, "/api/stats").await;
    assert_eq!(status, 200);
    let stats: Value = serde_json::from_str(&body).unwrap();
    assert!(stats["samples"].as_array().unwrap().iter().any(|s| s["name"] == "weir_records_committed_total"));
    gw.gateway.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Headless Chromium over the DevTools protocol
// ---------------------------------------------------------------------------------------------

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    socket: Socket,
    next_id: u64,
    /// Console errors and uncaught exceptions seen so far.
    errors: Vec<String>,
}

impl Browser {
    /// Starts Chromium on about:blank and attaches to its page.
    async fn launch() -> Self {
        let profile = tempfile::tempdir().unwrap();
        let chromium = ["chromium", "chromium-browser", "google-chrome"]
            .into_iter()
            .find(|name| {
                Command::new(name)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok()
            })
            .expect("no chromium: deploy/local/install-deps.sh installs Debian's chromium");
        let child = Command::new(chromium)
            .args([
                "--headless=new",
                // Root in a container has no user namespace for the sandbox.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--window-size=1500,1250",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let port_file = profile.path().join("DevToolsActivePort");
        let began = Instant::now();
        let port: u16 = loop {
            if let Some(port) =
                std::fs::read_to_string(&port_file).ok().and_then(|t| t.lines().next()?.parse().ok())
            {
                break port;
            }
            assert!(began.elapsed() < Duration::from_secs(30), "chromium did not open its DevTools port");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let devtools = SocketAddr::from(([127, 0, 0, 1], port));
        let page_url = loop {
            let (_, body) = get(devtools, "/json/list").await;
            let targets: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            let page = targets.as_array().and_then(|t| t.iter().find(|t| t["type"] == "page").cloned());
            if let Some(url) = page.and_then(|p| p["webSocketDebuggerUrl"].as_str().map(str::to_owned)) {
                break url;
            }
            assert!(began.elapsed() < Duration::from_secs(30), "chromium has no page target: {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (socket, _) = tokio_tungstenite::connect_async(page_url).await.unwrap();
        let mut browser = Browser { child, _profile: profile, socket, next_id: 0, errors: Vec::new() };
        for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
            browser.call(domain, json!({})).await;
        }
        browser
    }

    /// Sends one command and returns its result; events read meanwhile are checked for errors.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let command = json!({ "id": id, "method": method, "params": params }).to_string();
        self.socket.send(Message::Text(command.into())).await.unwrap();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"))
                .expect("devtools socket open")
                .unwrap();
            let Message::Text(text) = message else { continue };
            let value: Value = serde_json::from_str(&text).unwrap();
            if value["id"] == id {
                assert!(value.get("error").is_none(), "{method}: {value}");
                return value["result"].clone();
            }
            self.note_event(&value);
        }
    }

    fn note_event(&mut self, event: &Value) {
        let params = &event["params"];
        match event["method"].as_str() {
            Some("Runtime.exceptionThrown") => {
                self.errors.push(format!("exception: {}", params["exceptionDetails"]))
            }
            Some("Runtime.consoleAPICalled") if params["type"] == "error" => {
                self.errors.push(format!("console.error: {}", params["args"]))
            }
            Some("Log.entryAdded") if params["entry"]["level"] == "error" => {
                self.errors.push(format!("log: {}", params["entry"]))
            }
            _ => {}
        }
    }

    /// Evaluates `expression` in the page and returns its value.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        assert!(result.get("exceptionDetails").is_none(), "{expression}: {result}");
        result["result"]["value"].clone()
    }

    /// Polls `expression` until it is true.
    async fn wait_for(&mut self, within: Duration, expression: &str) -> bool {
        let began = Instant::now();
        while began.elapsed() < within {
            if self.eval(expression).await == Value::Bool(true) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        false
    }

    async fn screenshot(&mut self, path: &Path) {
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" })).await;
        let png = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap()).unwrap();
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(path, png).unwrap();
        println!("dashboard screenshot: {}", path.display());
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Devices publishing JSON readings at about `rate` per second each until `stop`, some with
/// flaws the dashboard must flag: `gappy-*` skip every fifth seq, `firmware-*` change their
/// metrics halfway.
async fn run_fleet(
    addr: SocketAddr,
    devices: usize,
    rate: u64,
    stop: tokio::sync::watch::Receiver<bool>,
) -> u64 {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..devices {
        let name = match i % 4 {
            0 => format!("gappy-{i}"),
            1 => format!("firmware-{i}"),
            _ => format!("sensor-{i}"),
        };
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut device = RawClient::connect(addr, &name).await;
            let (mut seq, mut sent) = (0u64, 0u64);
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / rate));
            while !*stop.borrow() {
                tick.tick().await;
                seq += if name.starts_with("gappy") && seq % 5 == 4 { 2 } else { 1 };
                let metrics = if name.starts_with("firmware") && seq > 20 {
                    r#""temp":21,"hum":40"#
                } else {
                    r#""temp":21"#
                };
                let payload = format!(r#"{{"seq":{seq},"ts":{},"metrics":{{{metrics}}}}}"#, now_ms());
                let pkid = u16::try_from(seq % 60_000 + 1).unwrap();
                device.send(&publish(QoS::AtLeastOnce, pkid, &format!("devices/{name}"), payload)).await;
                assert!(matches!(device.recv().await, Some(Packet::PubAck(_))), "{name}");
                sent += 1;
            }
            sent
        });
    }
    let mut sent = 0;
    while let Some(result) = tasks.join_next().await {
        sent += result.unwrap();
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet_live_without_console_errors() {
    const DEVICES: usize = 24;
    let gw = TestGateway::start("").await;
    let (mqtt, ops) = (gw.mqtt_addr(), gw.gateway.ops_addr());
    let mut browser = Browser::launch().await;
    browser.call("Page.navigate", json!({ "url": format!("http://{ops}/") })).await;
    assert!(browser.wait_for(Duration::from_secs(20), "document.readyState === 'complete'").await);
    assert_eq!(browser.eval("document.title").await, "weir");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let fleet = tokio::spawn(run_fleet(mqtt, DEVICES, 20, stop_rx));

    // The records chart moves: several polls with records coming in.
    let moving = "charts.records.series.has('in') && \
                  charts.records.series.get('in').filter(p => p[1] > 0).length >= 3";
    assert!(
        browser.wait_for(Duration::from_secs(30), moving).await,
        "the records chart never showed records coming in"
    );
    let connections = "(charts.conns.series.get('mqtt') || []).some(p => p[1] >= 24)";
    assert!(
        browser.wait_for(Duration::from_secs(15), connections).await,
        "the connections chart never showed the fleet"
    );

    // The device table: every device, the flawed ones flagged.
    let rows = format!("document.querySelectorAll('#devbody tr').length === {DEVICES}");
    assert!(
        browser.wait_for(Duration::from_secs(20), &rows).await,
        "the device table never listed the {DEVICES} devices"
    );
    let gappy = "document.querySelector('tr[data-device=\"gappy-0\"] .f-gaps') !== null";
    assert!(browser.wait_for(Duration::from_secs(20), gappy).await, "gappy-0 not flagged");
    let changed = "document.querySelector('tr[data-device=\"firmware-1\"] .f-schema_changed') !== null";
    assert!(browser.wait_for(Duration::from_secs(20), changed).await, "firmware-1 not flagged");
    let clean = "document.querySelector('tr[data-device=\"sensor-2\"] .flag') === null";
    assert!(browser.wait_for(Duration::from_secs(5), clean).await, "sensor-2 flagged");

    // Sorting by a column and filtering go through the API and back into the table.
    browser.eval("document.querySelector('th[data-sort=\"gaps\"]').click()").await;
    let sorted = "(document.querySelector('#devbody tr') || {}).dataset?.device?.startsWith('gappy')";
    assert!(
        browser.wait_for(Duration::from_secs(10), sorted).await,
        "sorting by gaps did not put a gappy device first"
    );
    browser.eval("document.querySelector('button[data-filter=\"schema_changed\"]').click()").await;
    let filtered = format!("document.querySelectorAll('#devbody tr').length === {}", DEVICES / 4);
    assert!(
        browser.wait_for(Duration::from_secs(10), &filtered).await,
        "the schema filter did not narrow the table"
    );
    browser.eval("document.querySelector('button[data-filter=\"\"]').click()").await;
    assert!(browser.wait_for(Duration::from_secs(10), &rows).await);

    if let Ok(path) = std::env::var("WEIR_DASHBOARD_SCREENSHOT") {
        // Let the charts gather a little history under load first.
        tokio::time::sleep(Duration::from_secs(20)).await;
        browser.screenshot(Path::new(&path)).await;
    }
    stop_tx.send(true).unwrap();
    let sent = fleet.await.unwrap();
    // Events that arrived while waiting.
    browser.eval("1").await;
    println!("dashboard under a fleet of {DEVICES} devices ({sent} messages): no console errors");
    assert!(browser.errors.is_empty(), "console errors: {:#?}", browser.errors);
    drop(browser);
    gw.gateway.shutdown().await;
}
