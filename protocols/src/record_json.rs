//! Records as JSON, one copy for every sink and tool: metrics and tags as JSON objects, a
//! record as one JSON object, and the protocol names sinks store.

use std::collections::BTreeMap;
use std::io::Write as _;

use weir_proto::{metric_value::Kind, MetricValue, Record, SourceProtocol};

/// Lowercase protocol name as stored in sinks.
pub fn protocol_name(protocol: SourceProtocol) -> &'static str {
    match protocol {
        SourceProtocol::Mqtt => "mqtt",
        SourceProtocol::MqttWs => "mqtt_ws",
        SourceProtocol::Websocket => "ws",
        SourceProtocol::Tcp => "tcp",
        SourceProtocol::Http => "http",
        SourceProtocol::MqttBridge => "mqtt_bridge",
        SourceProtocol::Unspecified => "unspecified",
    }
}

/// `{"name":value,...}` with numbers, booleans and strings as JSON values.
pub fn write_metrics_json(metrics: &BTreeMap<String, MetricValue>, out: &mut Vec<u8>) {
    out.push(b'{');
    for (i, (name, value)) in metrics.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let _ = serde_json::to_writer(&mut *out, name);
        out.push(b':');
        let _ = match &value.kind {
            Some(Kind::Number(n)) => serde_json::to_writer(&mut *out, n),
            Some(Kind::Flag(b)) => serde_json::to_writer(&mut *out, b),
            Some(Kind::Text(s)) => serde_json::to_writer(&mut *out, s),
            None => out.write_all(b"null").map_err(serde_json::Error::io),
        };
    }
    out.push(b'}');
}

pub fn write_tags_json(tags: &BTreeMap<String, String>, out: &mut Vec<u8>) {
    let _ = serde_json::to_writer(&mut *out, tags);
}

/// The record as one JSON object: device_id, seq, device_ts_ms, received_ts_ms, protocol,
/// source, metrics, tags (absent optional fields are null; the raw payload is not included).
pub fn write_record_json(r: &Record, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"device_id\":");
    let _ = serde_json::to_writer(&mut *out, &r.device_id);
    out.extend_from_slice(b",\"seq\":");
    let _ = serde_json::to_writer(&mut *out, &r.seq);
    out.extend_from_slice(b",\"device_ts_ms\":");
    let _ = serde_json::to_writer(&mut *out, &r.device_ts_ms);
    let _ = write!(
        out,
        ",\"received_ts_ms\":{},\"protocol\":\"{}\",\"source\":",
        r.received_ts_ms,
        protocol_name(r.protocol())
    );
    let _ = serde_json::to_writer(&mut *out, &r.source);
    out.extend_from_slice(b",\"metrics\":");
    write_metrics_json(&r.metrics, out);
    out.extend_from_slice(b",\"tags\":");
    write_tags_json(&r.tags, out);
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_proto::SourceProtocol;

    #[test]
    fn record_json_is_valid_and_complete() {
        let record = Record {
            device_id: "d\"1".into(),
            seq: Some(7),
            device_ts_ms: None,
            received_ts_ms: 5,
            protocol: SourceProtocol::Mqtt as i32,
            source: "a/b".into(),
            metrics: [
                ("t".to_string(), MetricValue { kind: Some(Kind::Number(1.5)) }),
                ("on".to_string(), MetricValue { kind: Some(Kind::Flag(true)) }),
                ("m".to_string(), MetricValue { kind: Some(Kind::Text("x\n".into())) }),
            ]
            .into(),
            tags: [("k".to_string(), "v".to_string())].into(),
            raw: Vec::new(),
        };
        let mut out = Vec::new();
        write_record_json(&record, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"device_id":"d\"1","seq":7,"device_ts_ms":null,"received_ts_ms":5,
                "protocol":"mqtt","source":"a/b","metrics":{"t":1.5,"on":true,"m":"x\n"},"tags":{"k":"v"}})
        );
    }
}
