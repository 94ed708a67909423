//! Config reload on a running gateway (what SIGHUP does with the config file, in process):
//! rates and publish rules change at once for open connections; what only a restart can change
//! is reported and left running as it was.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::*;
use weir::config::Config;
use weir_protocols::mqtt::{encode, Packet, QoS};

fn config(dir: &std::path::Path, rate: u32, acl: &str, linger_ms: u32) -> Config {
    let text = format!(
        "data_dir = {:?}\n[ops]\nlisten = \"127.0.0.1:0\"\n[[listeners]]\nprotocol = \"mqtt\"\nlisten = \"127.0.0.1:0\"\n\
         max_messages_per_s = {rate}\nacl = [{acl}]\n[fabric]\nlinger_ms = {linger_ms}\n[sink]\nkind = \"blackhole\"\n",
        dir.display().to_string()
    );
    Config::parse(&text, "reload.toml").unwrap()
}

/// Sends `n` QoS 1 messages at once on `device` and waits for their PUBACKs.
async fn burst(device: &mut RawClient, topic: &str, first: u16, n: u16) {
    let mut bytes = BytesMut::new();
    for pkid in first..first + n {
        encode(&publish(QoS::AtLeastOnce, pkid, topic, reading("d", pkid.into())), &mut bytes);
    }
    device.send_raw(&bytes).await.unwrap();
    for pkid in first..first + n {
        assert_eq!(device.recv().await, Some(Packet::PubAck(pkid)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rates_and_publish_rules_change_for_open_connections() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = weir::start(config(dir.path(), 100, r#"{ publish = "allowed/#" }"#, 5)).await.unwrap();
    let addr = gateway.listener_addrs()[0];
    let throttled = || metric_value(&gateway.metrics().encode(), "weir_throttled_total");

    // 300 at 100/s: paused.
    let mut device = RawClient::connect(addr, "d").await;
    burst(&mut device, "allowed/x", 1, 300).await;
    assert!(throttled() > 0);
    // Another topic is not allowed: a 3.1.1 device is disconnected.
    let mut other = RawClient::connect(addr, "other").await;
    other.send(&publish(QoS::AtLeastOnce, 1, "elsewhere/x", reading("other", 1))).await;
    assert!(other.closed_within(Duration::from_secs(5)).await, "a denied publish closes 3.1.1");

    let report = gateway.reload_config(config(
        dir.path(),
        0,
        r#"{ publish = "allowed/#" }, { publish = "elsewhere/#" }"#,
        5,
    ));
    assert_eq!(report.applied, ["listeners[0].max_messages_per_s, max_bytes_per_s", "listeners[0].acl"]);
    assert!(report.needs_restart.is_empty() && report.rejected.is_empty(), "{report:?}");

    // The same, still open connection: no longer paced.
    let before = throttled();
    burst(&mut device, "allowed/x", 301, 3000).await;
    assert_eq!(throttled(), before, "paused after the rate was lifted");
    let mut other = RawClient::connect(addr, "other").await;
    other.send(&publish(QoS::AtLeastOnce, 1, "elsewhere/x", reading("other", 1))).await;
    assert_eq!(other.recv().await, Some(Packet::PubAck(1)));

    // The fabric's linger needs a restart: reported, and the rest of the new config applied.
    let report = gateway.reload_config(config(dir.path(), 0, r#"{ publish = "elsewhere/#" }"#, 50));
    assert_eq!(report.applied, ["listeners[0].acl"]);
    assert_eq!(report.needs_restart, ["fabric"]);
    other.send(&publish(QoS::AtLeastOnce, 2, "elsewhere/y", reading("other", 2))).await;
    assert_eq!(other.recv().await, Some(Packet::PubAck(2)));
    device.send(&publish(QoS::AtLeastOnce, 1, "allowed/x", reading("d", 9))).await;
    assert!(device.closed_within(Duration::from_secs(5)).await, "allowed/# was dropped from the rules");
    let text = gateway.metrics().encode();
    assert!(text.contains("weir_config_reloads_total{result=\"ok\"} 1"), "{text}");
    assert!(text.contains("weir_config_reloads_total{result=\"partial\"} 1"), "{text}");
    gateway.shutdown().await;
}
