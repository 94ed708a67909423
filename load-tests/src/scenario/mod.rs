//! `weir-load run SCENARIO.toml`: a fleet of simulated devices described in a TOML file —
//! groups of devices over MQTT 3.1.1/5 (over TCP or WebSocket), WebSocket ingest or raw TCP,
//! each with its QoS, payload format and size, rate, and ramp-up — plus events on a timeline
//! (reconnect storms, bursts). It prints live progress, writes a JSON report and a
//! self-contained HTML page, and can read the sink back to count lost and duplicated records.
//!
//! ```toml
//! name = "mixed-fleet"
//! duration_s = 60
//!
//! [target]
//! mqtt = "127.0.0.1:1883"            # mqtt3, mqtt5
//! ws = "127.0.0.1:8080"              # ws (/ingest), mqtt_ws (/mqtt)
//! tcp = "127.0.0.1:7001"             # tcp: length-prefixed protobuf
//! tcp_lines = "127.0.0.1:7000"       # tcp_lines: NDJSON
//! source_addrs = ["127.0.0.1", "127.0.0.2"]
//!
//! [[devices]]
//! name = "meters"
//! count = 5000
//! protocol = "mqtt5"                 # mqtt3 | mqtt5 | mqtt_ws | ws | tcp | tcp_lines
//! qos = 1
//! payload = "json"                   # json | protobuf
//! payload_bytes = 128
//! rate = 1.0                         # messages per second per device; 0 = as fast as acks allow
//! ramp_up_s = 10
//!
//! [[events]]
//! at_s = 30
//! kind = "reconnect_storm"           # reconnect_storm | burst
//! fraction = 0.5
//!
//! [verify]
//! sink = "sqlite"                    # sqlite | postgres | kafka
//! db = "weir-data/telemetry.db"
//! ```

pub mod run;
mod sim;
mod stats;
pub mod wire;

use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Context};
use serde::Deserialize;

pub use run::{run, RunOptions};

/// One scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    /// Seconds of publishing, from the start (the ramp-up is part of it).
    pub duration_s: f64,
    /// How long after `duration_s` devices wait for outstanding acks before they give up.
    #[serde(default = "default_drain_timeout_s")]
    pub drain_timeout_s: f64,
    pub target: Target,
    pub devices: Vec<DeviceGroup>,
    #[serde(default)]
    pub events: Vec<Event>,
    pub verify: Option<Verify>,
}

fn default_drain_timeout_s() -> f64 {
    10.0
}

/// Where the devices connect.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub mqtt: Option<SocketAddr>,
    pub ws: Option<SocketAddr>,
    pub tcp: Option<SocketAddr>,
    pub tcp_lines: Option<SocketAddr>,
    /// Local addresses the connections are bound to, round-robin; each has its own ephemeral
    /// port range (about 28,000 ports), so tens of thousands of devices fit on one machine.
    /// Empty: the kernel picks.
    #[serde(default)]
    pub source_addrs: Vec<IpAddr>,
    /// Connection handshakes in progress at once, across all groups.
    #[serde(default = "default_connect_concurrency")]
    pub connect_concurrency: usize,
}

fn default_connect_concurrency() -> usize {
    256
}

/// How a group's devices talk to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// MQTT 3.1.1 over TCP (`target.mqtt`).
    Mqtt3,
    /// MQTT 5 over TCP (`target.mqtt`).
    Mqtt5,
    /// MQTT 5 over WebSocket at `/mqtt` (`target.ws`).
    MqttWs,
    /// WebSocket ingest at `/ingest?device=ID` (`target.ws`): one message per reading, one answer
    /// per message.
    Ws,
    /// Raw TCP, length-prefixed protobuf frames (`target.tcp`).
    Tcp,
    /// Raw TCP, NDJSON lines (`target.tcp_lines`).
    TcpLines,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Mqtt3 => "mqtt3",
            Protocol::Mqtt5 => "mqtt5",
            Protocol::MqttWs => "mqtt_ws",
            Protocol::Ws => "ws",
            Protocol::Tcp => "tcp",
            Protocol::TcpLines => "tcp_lines",
        }
    }

    fn is_mqtt(self) -> bool {
        matches!(self, Protocol::Mqtt3 | Protocol::Mqtt5 | Protocol::MqttWs)
    }
}

/// The payload encoding of a group's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadFormat {
    /// weir's device JSON: `{"device_id","seq","ts","metrics":{...}}`.
    Json,
    /// `weir.v1.DevicePayload` holding one `Reading`.
    Protobuf,
}

/// Devices that behave alike.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceGroup {
    pub name: String,
    pub count: usize,
    pub protocol: Protocol,
    /// MQTT only: 0 or 1. WebSocket and TCP messages are always answered.
    #[serde(default = "default_qos")]
    pub qos: u8,
    #[serde(default = "default_payload")]
    pub payload: PayloadFormat,
    #[serde(default = "default_payload_bytes")]
    pub payload_bytes: usize,
    /// Messages per second per device; 0 = as fast as `max_inflight` (or, at MQTT QoS 0, the
    /// socket) allows.
    #[serde(default = "default_rate")]
    pub rate: f64,
    /// Messages written and not yet answered, per device. MQTT 5 devices also respect the
    /// server's Receive Maximum.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: usize,
    /// Devices connect evenly spread over this many seconds from the start.
    #[serde(default)]
    pub ramp_up_s: f64,
    /// Device ids are `{id_prefix}-{i}`; default: the group name. Letters, digits, `-`, `_`, `.`.
    pub id_prefix: Option<String>,
    /// MQTT topic; `{device}` is replaced by the device id.
    #[serde(default = "default_topic")]
    pub topic: String,
}

fn default_qos() -> u8 {
    1
}
fn default_payload() -> PayloadFormat {
    PayloadFormat::Json
}
fn default_payload_bytes() -> usize {
    128
}
fn default_rate() -> f64 {
    1.0
}
fn default_max_inflight() -> usize {
    16
}
fn default_topic() -> String {
    "devices/{device}/telemetry".to_owned()
}

impl DeviceGroup {
    pub fn id_prefix(&self) -> &str {
        self.id_prefix.as_deref().unwrap_or(&self.name)
    }

    /// Whether every message gets an answer (MQTT QoS 1, WebSocket, TCP).
    pub fn acked(&self) -> bool {
        !self.protocol.is_mqtt() || self.qos > 0
    }
}

/// Something that happens to the fleet at a moment of the run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Seconds from the start.
    pub at_s: f64,
    pub kind: EventKind,
    /// The group it hits; default every group.
    pub group: Option<String>,
    /// reconnect_storm: the share of the devices whose connections drop at once and who all
    /// reconnect straight away (0 < fraction <= 1).
    pub fraction: Option<f64>,
    /// burst: how long the rate is multiplied.
    pub duration_s: Option<f64>,
    /// burst: the rate multiplier.
    pub factor: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    ReconnectStorm,
    Burst,
}

/// Where the run's records land, to read them back after the run.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "sink", rename_all = "snake_case", deny_unknown_fields)]
pub enum Verify {
    Sqlite {
        db: std::path::PathBuf,
        #[serde(default = "default_table")]
        table: String,
    },
    Postgres {
        #[serde(default = "default_postgres_url")]
        url: String,
        #[serde(default = "default_table")]
        table: String,
    },
    Kafka {
        #[serde(default = "default_brokers")]
        brokers: String,
        topic: String,
        #[serde(default = "default_kafka_idle_s")]
        idle_timeout_s: u64,
    },
}

fn default_table() -> String {
    "telemetry".to_owned()
}
fn default_postgres_url() -> String {
    crate::postgres::DEFAULT_URL.to_owned()
}
fn default_brokers() -> String {
    "127.0.0.1:9092".to_owned()
}
fn default_kafka_idle_s() -> u64 {
    10
}

impl Scenario {
    /// Parses and checks a scenario file's text; errors name the field and what is wrong.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let scenario: Scenario = toml::from_str(text).context("the scenario file is not valid")?;
        scenario.check()?;
        Ok(scenario)
    }

    /// Checks the values (after an override); [`Scenario::parse`] calls it.
    pub fn check(&self) -> anyhow::Result<()> {
        let positive = |value: f64, what: &str| -> anyhow::Result<()> {
            if !(value.is_finite() && value > 0.0) {
                bail!("{what} must be a positive number of seconds, got {value}");
            }
            Ok(())
        };
        positive(self.duration_s, "duration_s")?;
        if !(self.drain_timeout_s.is_finite() && self.drain_timeout_s >= 0.0) {
            bail!("drain_timeout_s must be 0 or more, got {}", self.drain_timeout_s);
        }
        if self.devices.is_empty() {
            bail!("no [[devices]] group: the scenario has nothing to run");
        }
        if self.target.connect_concurrency == 0 {
            bail!("target.connect_concurrency must be at least 1");
        }
        let mut prefixes = std::collections::HashSet::new();
        for group in &self.devices {
            let name = &group.name;
            if group.count == 0 {
                bail!("devices \"{name}\": count must be at least 1");
            }
            let prefix = group.id_prefix();
            if prefix.is_empty()
                || !prefix.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            {
                bail!("devices \"{name}\": the device id prefix {prefix:?} may use letters, digits, '-', '_' and '.' only");
            }
            if !prefixes.insert(prefix) {
                bail!("devices \"{name}\": id prefix {prefix:?} is used by another group (device ids must differ)");
            }
            if group.qos > 1 {
                bail!("devices \"{name}\": qos must be 0 or 1, got {}", group.qos);
            }
            if !group.protocol.is_mqtt() && group.qos == 0 {
                bail!(
                    "devices \"{name}\": qos 0 is MQTT only; {} messages are always answered",
                    group.protocol.name()
                );
            }
            if !(group.rate.is_finite() && group.rate >= 0.0) {
                bail!("devices \"{name}\": rate must be 0 (flat out) or more, got {}", group.rate);
            }
            if group.max_inflight == 0 || group.max_inflight > 65_535 {
                bail!("devices \"{name}\": max_inflight must be 1..=65535, got {}", group.max_inflight);
            }
            if !(group.ramp_up_s.is_finite() && group.ramp_up_s >= 0.0 && group.ramp_up_s < self.duration_s) {
                bail!("devices \"{name}\": ramp_up_s must be at least 0 and shorter than duration_s");
            }
            if group.protocol == Protocol::TcpLines && group.payload == PayloadFormat::Protobuf {
                bail!("devices \"{name}\": tcp_lines carries JSON lines; use protocol \"tcp\" for protobuf");
            }
            if group.payload_bytes > 1 << 20 {
                bail!("devices \"{name}\": payload_bytes over 1 MiB");
            }
            if group.protocol.is_mqtt() && (group.topic.is_empty() || group.topic.contains(['+', '#'])) {
                bail!("devices \"{name}\": topic must be non-empty and without wildcards");
            }
            if self.target.addr(group.protocol).is_none() {
                bail!(
                    "devices \"{name}\": protocol {} needs target.{}",
                    group.protocol.name(),
                    Target::field(group.protocol)
                );
            }
        }
        for event in &self.events {
            if !(event.at_s.is_finite() && event.at_s >= 0.0 && event.at_s < self.duration_s) {
                bail!("events: at_s = {} is not within the run (0..{})", event.at_s, self.duration_s);
            }
            let groups: Vec<&DeviceGroup> = match &event.group {
                Some(name) => match self.devices.iter().find(|g| &g.name == name) {
                    Some(group) => vec![group],
                    None => bail!("events: no device group named {name:?}"),
                },
                None => self.devices.iter().collect(),
            };
            match event.kind {
                EventKind::ReconnectStorm => {
                    let fraction = event.fraction.unwrap_or(1.0);
                    if !(fraction > 0.0 && fraction <= 1.0) {
                        bail!("events: a reconnect_storm's fraction must be in (0, 1], got {fraction}");
                    }
                    if event.duration_s.is_some() || event.factor.is_some() {
                        bail!("events: a reconnect_storm takes at_s, group and fraction only");
                    }
                }
                EventKind::Burst => {
                    let (Some(duration), Some(factor)) = (event.duration_s, event.factor) else {
                        bail!("events: a burst needs duration_s and factor");
                    };
                    positive(duration, "a burst's duration_s")?;
                    if !(factor.is_finite() && factor > 0.0) {
                        bail!("events: a burst's factor must be a positive number, got {factor}");
                    }
                    if event.fraction.is_some() {
                        bail!("events: a burst takes at_s, group, duration_s and factor only");
                    }
                    if let Some(group) = groups.iter().find(|g| g.rate == 0.0) {
                        bail!("events: a burst on group \"{}\", which runs flat out (rate = 0)", group.name);
                    }
                }
            }
        }
        Ok(())
    }

    /// All devices of all groups.
    pub fn device_count(&self) -> usize {
        self.devices.iter().map(|g| g.count).sum()
    }
}

impl Target {
    /// The address a protocol connects to.
    pub fn addr(&self, protocol: Protocol) -> Option<SocketAddr> {
        match protocol {
            Protocol::Mqtt3 | Protocol::Mqtt5 => self.mqtt,
            Protocol::MqttWs | Protocol::Ws => self.ws,
            Protocol::Tcp => self.tcp,
            Protocol::TcpLines => self.tcp_lines,
        }
    }

    fn field(protocol: Protocol) -> &'static str {
        match protocol {
            Protocol::Mqtt3 | Protocol::Mqtt5 => "mqtt",
            Protocol::MqttWs | Protocol::Ws => "ws",
            Protocol::Tcp => "tcp",
            Protocol::TcpLines => "tcp_lines",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIXED: &str = r#"
        name = "mixed"
        duration_s = 20
        [target]
        mqtt = "127.0.0.1:1883"
        ws = "127.0.0.1:8080"
        tcp = "127.0.0.1:7001"
        source_addrs = ["127.0.0.2", "127.0.0.3"]
        [[devices]]
        name = "meters"
        count = 100
        protocol = "mqtt5"
        ramp_up_s = 5
        [[devices]]
        name = "cams"
        count = 10
        protocol = "ws"
        payload = "protobuf"
        rate = 0
        [[events]]
        at_s = 10
        kind = "reconnect_storm"
        fraction = 0.5
        [[events]]
        at_s = 12
        kind = "burst"
        group = "meters"
        duration_s = 2
        factor = 10
        [verify]
        sink = "sqlite"
        db = "weir-data/telemetry.db"
    "#;

    #[test]
    fn a_mixed_fleet_parses_with_its_defaults() {
        let scenario = Scenario::parse(MIXED).unwrap();
        assert_eq!(scenario.device_count(), 110);
        let meters = &scenario.devices[0];
        assert_eq!(
            (meters.qos, meters.payload, meters.payload_bytes, meters.rate),
            (1, PayloadFormat::Json, 128, 1.0)
        );
        assert_eq!(meters.id_prefix(), "meters");
        assert_eq!(scenario.target.source_addrs.len(), 2);
        assert_eq!(scenario.target.addr(Protocol::MqttWs), Some("127.0.0.1:8080".parse().unwrap()));
        assert!(matches!(scenario.verify, Some(Verify::Sqlite { ref table, .. }) if table == "telemetry"));
        assert_eq!(scenario.drain_timeout_s, 10.0);
    }

    fn error_of(edit: impl Fn(&str) -> String) -> String {
        match Scenario::parse(&edit(MIXED)) {
            Ok(_) => panic!("the edited scenario should be refused"),
            Err(error) => format!("{error:#}"),
        }
    }

    #[test]
    fn mistakes_are_refused_with_what_is_wrong() {
        // (text in the valid file, what replaces it, what the error must say)
        let cases = [
            ("count = 100", "count = 0", "count must be at least 1"),
            ("duration_s = 20", "duration_s = -1", "duration_s must be a positive"),
            ("ws = \"127.0.0.1:8080\"", "", "needs target.ws"),
            ("protocol = \"mqtt5\"", "protocol = \"mqtt7\"", "mqtt7"),
            ("fraction = 0.5", "fraction = 1.5", "fraction must be in (0, 1]"),
            ("group = \"meters\"", "group = \"cams\"", "runs flat out"),
            ("at_s = 12", "at_s = 25", "not within the run"),
            ("duration_s = 20", "duration_s = 20\nspeed = 3", "unknown field `speed`"),
            ("name = \"cams\"", "name = \"cams\"\nid_prefix = \"meters\"", "used by another group"),
        ];
        for (from, to, expected) in cases {
            assert!(MIXED.contains(from), "{from:?} is not in the scenario");
            let edited = MIXED.replace(from, to);
            match Scenario::parse(&edited) {
                Ok(_) => panic!("expected an error with {expected:?}"),
                Err(error) => {
                    let text = format!("{error:#}");
                    assert!(text.contains(expected), "{text:?} lacks {expected:?}");
                }
            }
        }
        assert!(error_of(|s| s.replace("payload = \"protobuf\"", "qos = 0")).contains("qos 0 is MQTT only"));
        assert!(error_of(|s| s.replace("ramp_up_s = 5", "ramp_up_s = 20")).contains("ramp_up_s"));
    }
}
