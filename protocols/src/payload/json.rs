//! JSON device payloads: one reading object, `{"device_id", "readings": [...]}`, or an array.
//!
//! A reading's reserved keys are `device_id`, `seq`, `ts` (integer milliseconds since the epoch or
//! an RFC 3339 string), `metrics` (object) and `tags` (object). Every other key is a metric too, so
//! both `{"metrics":{"temp":21.5}}` and the flat `{"temp":21.5}` work; nested objects are flattened
//! with `.` (`{"gps":{"lat":1}}` → `gps.lat`), nulls are skipped, arrays are an error.

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use weir_proto::{metric_value::Kind, MetricValue, Record};

use super::{check_reading_count, finish_record, DecodeContext, PayloadError};

/// Flattening stops here; deeper nesting is an error rather than a stack risk.
const MAX_DEPTH: usize = 8;

pub(super) fn decode(
    payload: &[u8],
    ctx: &DecodeContext<'_>,
    out: &mut Vec<Record>,
) -> Result<(), PayloadError> {
    let value: Value = serde_json::from_slice(payload).map_err(|e| PayloadError::Json(e.to_string()))?;
    match value {
        Value::Array(items) => decode_readings(items, "", payload, ctx, out),
        Value::Object(mut object) => match object.remove("readings") {
            Some(Value::Array(items)) => {
                let device_id = match object.remove("device_id") {
                    None => String::new(),
                    Some(v) => string_field("device_id", v)?,
                };
                if let Some(key) = object.keys().next() {
                    return Err(PayloadError::InvalidField {
                        field: key.clone(),
                        reason: "a batch holds only `device_id` and `readings`",
                    });
                }
                decode_readings(items, &device_id, payload, ctx, out)
            }
            Some(_) => Err(PayloadError::InvalidField {
                field: "readings".into(),
                reason: "must be an array of reading objects",
            }),
            None => {
                let record = reading(object)?;
                out.push(finish_record(record, "", payload, ctx)?);
                Ok(())
            }
        },
        other => Err(PayloadError::UnexpectedJson(kind_name(&other))),
    }
}

fn decode_readings(
    items: Vec<Value>,
    batch_device_id: &str,
    payload: &[u8],
    ctx: &DecodeContext<'_>,
    out: &mut Vec<Record>,
) -> Result<(), PayloadError> {
    check_reading_count(items.len(), &ctx.limits)?;
    out.reserve(items.len());
    for item in items {
        let Value::Object(object) = item else {
            return Err(PayloadError::UnexpectedJson(kind_name(&item)));
        };
        out.push(finish_record(reading(object)?, batch_device_id, payload, ctx)?);
    }
    Ok(())
}

fn reading(object: Map<String, Value>) -> Result<Record, PayloadError> {
    let mut record = Record::default();
    for (key, value) in object {
        match key.as_str() {
            "device_id" => record.device_id = string_field("device_id", value)?,
            "seq" => record.seq = Some(seq_field(value)?),
            "ts" => record.device_ts_ms = timestamp_field(value)?,
            "tags" => record.tags = tags_field(value)?,
            "metrics" => match value {
                Value::Object(metrics) => {
                    for (name, v) in metrics {
                        add_metric(&mut record.metrics, name, v, 1)?;
                    }
                }
                Value::Null => {}
                _ => {
                    return Err(PayloadError::InvalidField {
                        field: key,
                        reason: "must be an object of name → value",
                    })
                }
            },
            _ => add_metric(&mut record.metrics, key, value, 1)?,
        }
    }
    Ok(record)
}

fn add_metric(
    metrics: &mut BTreeMap<String, MetricValue>,
    name: String,
    value: Value,
    depth: usize,
) -> Result<(), PayloadError> {
    let kind = match value {
        Value::Null => return Ok(()),
        Value::Bool(b) => Kind::Flag(b),
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.is_finite() => Kind::Number(f),
            _ => return Err(PayloadError::InvalidField { field: name, reason: "number out of range" }),
        },
        Value::String(s) => Kind::Text(s),
        Value::Array(_) => {
            return Err(PayloadError::InvalidField {
                field: name,
                reason: "arrays are not metric values (use a batch for many readings)",
            })
        }
        Value::Object(inner) => {
            if depth >= MAX_DEPTH {
                return Err(PayloadError::InvalidField { field: name, reason: "nested too deeply" });
            }
            for (child, v) in inner {
                add_metric(metrics, format!("{name}.{child}"), v, depth + 1)?;
            }
            return Ok(());
        }
    };
    metrics.insert(name, MetricValue { kind: Some(kind) });
    Ok(())
}

fn string_field(field: &'static str, value: Value) -> Result<String, PayloadError> {
    match value {
        Value::String(s) => Ok(s),
        _ => Err(PayloadError::InvalidField { field: field.into(), reason: "must be a string" }),
    }
}

fn seq_field(value: Value) -> Result<u64, PayloadError> {
    value
        .as_u64()
        .ok_or(PayloadError::InvalidField { field: "seq".into(), reason: "must be a non-negative integer" })
}

fn timestamp_field(value: Value) -> Result<Option<i64>, PayloadError> {
    let invalid = |reason| PayloadError::InvalidField { field: "ts".into(), reason };
    match value {
        Value::Null => Ok(None),
        Value::Number(n) => {
            n.as_i64().map(Some).ok_or(invalid("must be integer milliseconds since the Unix epoch"))
        }
        Value::String(s) => {
            let time =
                humantime::parse_rfc3339_weak(&s).map_err(|_| invalid("must be an RFC 3339 timestamp"))?;
            let millis = match time.duration_since(std::time::UNIX_EPOCH) {
                Ok(after) => i64::try_from(after.as_millis()),
                Err(before) => i64::try_from(before.duration().as_millis()).map(|m| -m),
            };
            millis.map(Some).map_err(|_| invalid("out of range"))
        }
        _ => Err(invalid("must be milliseconds or an RFC 3339 string")),
    }
}

fn tags_field(value: Value) -> Result<BTreeMap<String, String>, PayloadError> {
    let Value::Object(object) = value else {
        return Err(PayloadError::InvalidField {
            field: "tags".into(),
            reason: "must be an object of name → string",
        });
    };
    object
        .into_iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k, s)),
            Value::Number(n) => Ok((k, n.to_string())),
            Value::Bool(b) => Ok((k, b.to_string())),
            _ => Err(PayloadError::InvalidField { field: k, reason: "tag values must be scalars" }),
        })
        .collect()
}

fn kind_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::ctx;
    use super::*;
    use weir_proto::SourceProtocol;

    fn one(payload: &str) -> Result<Record, PayloadError> {
        let mut out = Vec::new();
        decode(payload.as_bytes(), &ctx(), &mut out)?;
        assert_eq!(out.len(), 1);
        Ok(out.pop().unwrap())
    }

    fn number(r: &Record, name: &str) -> f64 {
        match r.metrics[name].kind {
            Some(Kind::Number(n)) => n,
            ref other => panic!("{name} is {other:?}"),
        }
    }

    #[test]
    fn full_reading_with_reserved_keys() {
        let r = one(r#"{"device_id":"d1","seq":42,"ts":1700000000000,
                "metrics":{"temp":21.5,"on":true,"mode":"eco"},"tags":{"site":"a","floor":3}}"#)
        .unwrap();
        assert_eq!(r.device_id, "d1");
        assert_eq!(r.seq, Some(42));
        assert_eq!(r.device_ts_ms, Some(1_700_000_000_000));
        assert_eq!(number(&r, "temp"), 21.5);
        assert_eq!(r.metrics["on"].kind, Some(Kind::Flag(true)));
        assert_eq!(r.metrics["mode"].kind, Some(Kind::Text("eco".into())));
        assert_eq!(r.tags["floor"], "3");
        assert_eq!(r.received_ts_ms, 1_700_000_000_123);
        assert_eq!(r.protocol, SourceProtocol::Mqtt as i32);
        assert_eq!(r.source, "devices/client-7/telemetry");
    }

    #[test]
    fn flat_reading_takes_device_id_from_connection_and_flattens_objects() {
        let r = one(r#"{"temp":20,"gps":{"lat":1.5,"lon":{"deg":2}},"note":null}"#).unwrap();
        assert_eq!(r.device_id, "client-7");
        assert_eq!(r.seq, None);
        assert_eq!(number(&r, "temp"), 20.0);
        assert_eq!(number(&r, "gps.lat"), 1.5);
        assert_eq!(number(&r, "gps.lon.deg"), 2.0);
        assert!(!r.metrics.contains_key("note"));
    }

    #[test]
    fn rfc3339_timestamp() {
        let r = one(r#"{"ts":"2023-11-14T22:13:20.5Z","v":1}"#).unwrap();
        assert_eq!(r.device_ts_ms, Some(1_700_000_000_500));
    }

    #[test]
    fn batch_object_and_array_forms() {
        let mut out = Vec::new();
        let batch = r#"{"device_id":"gw","readings":[{"seq":1,"v":1},{"device_id":"d2","seq":2,"v":2}]}"#;
        decode(batch.as_bytes(), &ctx(), &mut out).unwrap();
        assert_eq!(out.iter().map(|r| r.device_id.as_str()).collect::<Vec<_>>(), ["gw", "d2"]);
        out.clear();
        decode(br#"[{"seq":1},{"seq":2}]"#, &ctx(), &mut out).unwrap();
        assert_eq!(out.iter().map(|r| r.seq).collect::<Vec<_>>(), [Some(1), Some(2)]);
        assert!(out.iter().all(|r| r.device_id == "client-7"));
    }

    #[test]
    fn errors_name_the_field_and_reason() {
        let cases = [
            (r#"{"seq":-1}"#, "field `seq`: must be a non-negative integer"),
            (r#"{"seq":"1"}"#, "field `seq`: must be a non-negative integer"),
            (r#"{"ts":"yesterday"}"#, "field `ts`: must be an RFC 3339 timestamp"),
            (r#"{"device_id":5}"#, "field `device_id`: must be a string"),
            (r#"{"v":[1,2]}"#, "field `v`: arrays are not metric values (use a batch for many readings)"),
            (r#"{"tags":{"a":{}}}"#, "field `a`: tag values must be scalars"),
            (r#"{"readings":{}}"#, "field `readings`: must be an array of reading objects"),
            (r#"{"readings":[],"x":1}"#, "field `x`: a batch holds only `device_id` and `readings`"),
            (r#"[1]"#, "expected a JSON object or array of readings, found a number"),
            (r#""hi""#, "expected a JSON object or array of readings, found a string"),
            (r#"{"seq":9223372036854775808}"#, "seq 9223372036854775808 is larger than 2^63-1"),
        ];
        for (payload, want) in cases {
            assert_eq!(one(payload).unwrap_err().to_string(), want, "payload {payload}");
        }
        assert!(matches!(one("{\"a\":"), Err(PayloadError::Json(_))));
        assert!(matches!(one("\u{0}\u{1}"), Err(PayloadError::Json(_))));
    }

    #[test]
    fn limits_are_enforced() {
        let mut c = ctx();
        c.limits.max_readings = 2;
        c.limits.max_fields = 2;
        c.limits.max_device_id_len = 3;
        let mut out = Vec::new();
        let err = |p: &str, out: &mut Vec<Record>| decode(p.as_bytes(), &c, out).unwrap_err();
        let readings = r#"{"device_id":"abc","readings":[{},{},{}]}"#;
        assert_eq!(err(readings, &mut out), PayloadError::TooManyReadings { count: 3, max: 2 });
        let fields = r#"{"device_id":"abc","a":1,"b":2,"c":3}"#;
        assert_eq!(err(fields, &mut out), PayloadError::TooManyFields { count: 3, max: 2 });
        let long = r#"{"device_id":"long"}"#;
        assert_eq!(err(long, &mut out), PayloadError::DeviceIdTooLong { len: 4, max: 3 });
        // The connection's id ("client-7") is held to the same limit.
        assert_eq!(err(r#"{"a":1}"#, &mut out), PayloadError::DeviceIdTooLong { len: 8, max: 3 });
        let deep = format!("{}1{}", r#"{"a":"#.repeat(20), "}".repeat(20));
        assert!(matches!(err(&deep, &mut out), PayloadError::InvalidField { .. }));
        assert!(out.is_empty());
    }

    #[test]
    fn missing_device_id_without_fallback() {
        let mut c = ctx();
        c.fallback_device_id = "";
        let mut out = Vec::new();
        assert_eq!(decode(b"{}", &c, &mut out), Err(PayloadError::MissingDeviceId));
    }
}
