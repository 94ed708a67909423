//! `weir-load run` (issue 9's device simulator) against a real `weir` process with every device
//! protocol on loopback, into SQLite: a mixed fleet over MQTT 3.1.1 (QoS 0 and 1), MQTT 5 with
//! protobuf payloads, MQTT over WebSocket, WebSocket ingest, length-prefixed TCP and NDJSON TCP,
//! with a ramp-up, a reconnect storm that drops half the devices and a burst. The table is read
//! back: nothing acknowledged may be missing, and every group must have been answered.

mod common;

use common::process::{free_port, WeirProcess};
use weir_load::html;
use weir_load::scenario::{self, RunOptions, Scenario};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_fleet_with_a_storm_and_a_burst_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (ws, tcp, lines) = (free_port(), free_port(), free_port());
    let listeners = format!(
        "[[listeners]]\nprotocol = \"ws\"\nlisten = \"{ws}\"\n\n\
         [[listeners]]\nprotocol = \"tcp\"\nlisten = \"{tcp}\"\nframing = \"length_prefixed\"\n\n\
         [[listeners]]\nprotocol = \"tcp\"\nlisten = \"{lines}\"\nframing = \"lines\"\n"
    );
    let mut weir = WeirProcess::new(dir.path(), "committed", "", &listeners);
    weir.start().await;

    let text = format!(
        r#"
        name = "mixed-fleet-test"
        duration_s = 6
        drain_timeout_s = 20
        [target]
        mqtt = "{mqtt}"
        ws = "{ws}"
        tcp = "{tcp}"
        tcp_lines = "{lines}"
        source_addrs = ["127.0.0.1", "127.0.0.2"]

        [[devices]]
        name = "v311"
        count = 20
        protocol = "mqtt3"
        rate = 20
        ramp_up_s = 1
        [[devices]]
        name = "v5-proto"
        count = 20
        protocol = "mqtt5"
        payload = "protobuf"
        rate = 20
        [[devices]]
        name = "qos0"
        count = 10
        protocol = "mqtt3"
        qos = 0
        rate = 20
        [[devices]]
        name = "over-ws"
        count = 10
        protocol = "mqtt_ws"
        rate = 20
        [[devices]]
        name = "ingest"
        count = 10
        protocol = "ws"
        rate = 20
        [[devices]]
        name = "ingest-proto"
        count = 10
        protocol = "ws"
        payload = "protobuf"
        rate = 20
        [[devices]]
        name = "frames"
        count = 10
        protocol = "tcp"
        payload = "protobuf"
        rate = 20
        [[devices]]
        name = "ndjson"
        count = 10
        protocol = "tcp_lines"
        rate = 20

        [[events]]
        at_s = 2
        kind = "reconnect_storm"
        fraction = 0.5
        [[events]]
        at_s = 3
        kind = "burst"
        group = "v311"
        duration_s = 1.5
        factor = 5

        [verify]
        sink = "sqlite"
        db = "{db}"
        "#,
        mqtt = weir.mqtt,
        db = weir.db_path().display(),
    );
    let scenario = Scenario::parse(&text).unwrap();
    let options =
        RunOptions { label: "weir".into(), scenario_text: text.clone(), quiet: true, cpu_pid: None };
    let outcome = scenario::run(&scenario, &options).await.unwrap();
    let report = &outcome.report;
    let totals = &report.totals;
    println!(
        "SCENARIO sent={} acked={} reconnects={} resent={} errors={} verify={:?} reasons={:?}",
        totals.sent,
        totals.acked,
        totals.reconnects,
        totals.resent,
        totals.errors,
        report.verify,
        outcome.errors_by_reason
    );

    let verify = report.verify.as_ref().expect("the scenario reads the table back");
    assert!(verify.passed, "acknowledged records are missing: {verify:?}\n{}", weir.log_tail(30));
    assert_eq!(verify.lost, 0);
    assert_eq!(verify.duplicates, 0, "the SQLite table keeps (device_id, seq) once");
    assert!(verify.acked > 0 && verify.found >= verify.acked, "{verify:?}");
    assert_eq!(totals.devices, 100);
    assert_eq!(totals.connected_peak, 100, "every device connected at once at some point");
    assert!(outcome.errors_by_reason.is_empty(), "{:?}", outcome.errors_by_reason);
    for group in &report.groups {
        assert!(group.sent > 0, "group {} sent nothing", group.name);
        if group.qos == 1 {
            assert!(
                group.acked > 0 && group.latency_ms.is_some(),
                "group {} was not answered: {group:?}",
                group.name
            );
        } else {
            assert_eq!(group.acked, 0, "QoS 0 is not answered");
        }
    }
    // The storm dropped about half of the 100 devices (a hash decides which), and they came back.
    assert!((25..=75).contains(&totals.reconnects), "reconnects {}", totals.reconnects);
    // The burst: v311 wrote more than its 20/s x 6 s x 20 devices would without it.
    let v311 = &report.groups[0];
    assert!(v311.sent > 20 * 6 * 20, "v311 sent {}", v311.sent);
    let kinds: Vec<&str> = report.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["ramp-up done", "reconnect storm", "burst start", "burst end"]);
    assert!(report.timeline.len() >= 6, "one point per second: {}", report.timeline.len());
    let per_second: u64 = report.timeline.iter().map(|p| p.sent).sum();
    assert_eq!(per_second, totals.sent, "the timeline adds up to the totals");

    // Every device's counts: what the verifier checked.
    assert_eq!(outcome.devices.len(), 100);
    assert!(outcome.devices.keys().any(|id| id.starts_with("ndjson-")));
    let page = html::render(report);
    assert!(page.contains("mixed-fleet-test"));
    weir.terminate().await;
}
