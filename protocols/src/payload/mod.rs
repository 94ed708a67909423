//! Device payload decoders (JSON, Protobuf) into canonical records.

mod json;
mod protobuf;

use weir_proto::{Record, SourceProtocol};

/// How a listener interprets message payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadFormat {
    Json,
    Protobuf,
    /// JSON when the first non-blank byte is `{` or `[`, Protobuf otherwise.
    Auto,
}

/// Where a payload came from; fills the record fields the payload itself does not carry.
#[derive(Debug, Clone, Copy)]
pub struct DecodeContext<'a> {
    /// Device id used when the payload names none (MQTT client id, authenticated identity).
    pub fallback_device_id: &'a str,
    pub protocol: SourceProtocol,
    /// MQTT topic, WebSocket/HTTP path or TCP listener address.
    pub source: &'a str,
    /// Gateway clock at receipt, milliseconds since the Unix epoch (time is passed in).
    pub received_ts_ms: i64,
    /// Keep the raw payload in `Record::raw`.
    pub keep_raw: bool,
    pub limits: PayloadLimits,
}

/// Bounds on what one message may expand into.
#[derive(Debug, Clone, Copy)]
pub struct PayloadLimits {
    /// Readings in one message (batch form); more is an error for the whole message.
    pub max_readings: usize,
    /// Metrics plus tags in one reading.
    pub max_fields: usize,
    /// Bytes in a device id.
    pub max_device_id_len: usize,
}

impl Default for PayloadLimits {
    fn default() -> Self {
        Self { max_readings: 10_000, max_fields: 1_000, max_device_id_len: 256 }
    }
}

/// Why a payload could not become records. The whole message is dead-lettered with this reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PayloadError {
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("invalid protobuf DevicePayload: {0}")]
    Protobuf(String),
    #[error("text payload is not JSON (a JSON payload starts with {{ or [) and not a protobuf DevicePayload ({0})")]
    NotJsonNorProtobuf(String),
    #[error("protobuf DevicePayload has no reading or batch")]
    EmptyPayload,
    #[error("a hello (device identification) is only valid as the first frame of a raw TCP connection")]
    UnexpectedHello,
    #[error("expected a JSON object or array of readings, found {0}")]
    UnexpectedJson(&'static str),
    #[error("field `{field}`: {reason}")]
    InvalidField { field: String, reason: &'static str },
    #[error("no device id in the payload and none from the connection")]
    MissingDeviceId,
    #[error("device id is {len} bytes, more than the limit of {max}")]
    DeviceIdTooLong { len: usize, max: usize },
    #[error("{count} readings in one message, more than the limit of {max}")]
    TooManyReadings { count: usize, max: usize },
    #[error("{count} metrics and tags in one reading, more than the limit of {max}")]
    TooManyFields { count: usize, max: usize },
    #[error("seq {0} is larger than 2^63-1")]
    SeqOutOfRange(u64),
}

/// Decodes one message into records appended to `out`. On error `out` is left as it was.
pub fn decode(
    format: PayloadFormat,
    payload: &[u8],
    ctx: &DecodeContext<'_>,
    out: &mut Vec<Record>,
) -> Result<(), PayloadError> {
    let start = out.len();
    let result = match resolve_format(format, payload) {
        PayloadFormat::Protobuf => protobuf::decode(payload, ctx, out).map_err(|e| match e {
            // Text that is not JSON was most likely meant as JSON: say so, not "bad wire type".
            PayloadError::Protobuf(detail)
                if format == PayloadFormat::Auto && std::str::from_utf8(payload).is_ok() =>
            {
                PayloadError::NotJsonNorProtobuf(detail)
            }
            other => other,
        }),
        _ => json::decode(payload, ctx, out),
    };
    if result.is_err() {
        out.truncate(start);
    }
    result
}

/// Picks the decoder for `payload` under `format`.
pub fn resolve_format(format: PayloadFormat, payload: &[u8]) -> PayloadFormat {
    match format {
        PayloadFormat::Auto => match payload.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') | Some(b'[') => PayloadFormat::Json,
            _ => PayloadFormat::Protobuf,
        },
        other => other,
    }
}

/// Fills and checks the fields shared by every reading, whatever its encoding.
fn finish_record(
    mut record: Record,
    batch_device_id: &str,
    payload: &[u8],
    ctx: &DecodeContext<'_>,
) -> Result<Record, PayloadError> {
    if record.device_id.is_empty() {
        record.device_id =
            if batch_device_id.is_empty() { ctx.fallback_device_id } else { batch_device_id }.to_owned();
    }
    if record.device_id.is_empty() {
        return Err(PayloadError::MissingDeviceId);
    }
    if record.device_id.len() > ctx.limits.max_device_id_len {
        return Err(PayloadError::DeviceIdTooLong {
            len: record.device_id.len(),
            max: ctx.limits.max_device_id_len,
        });
    }
    if let Some(seq) = record.seq {
        if seq > i64::MAX as u64 {
            return Err(PayloadError::SeqOutOfRange(seq));
        }
    }
    let fields = record.metrics.len() + record.tags.len();
    if fields > ctx.limits.max_fields {
        return Err(PayloadError::TooManyFields { count: fields, max: ctx.limits.max_fields });
    }
    record.received_ts_ms = ctx.received_ts_ms;
    record.protocol = ctx.protocol as i32;
    record.source = ctx.source.to_owned();
    if ctx.keep_raw {
        record.raw = payload.to_vec();
    }
    Ok(record)
}

fn check_reading_count(count: usize, limits: &PayloadLimits) -> Result<(), PayloadError> {
    if count > limits.max_readings {
        return Err(PayloadError::TooManyReadings { count, max: limits.max_readings });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn ctx() -> DecodeContext<'static> {
        DecodeContext {
            fallback_device_id: "client-7",
            protocol: SourceProtocol::Mqtt,
            source: "devices/client-7/telemetry",
            received_ts_ms: 1_700_000_000_123,
            keep_raw: false,
            limits: PayloadLimits::default(),
        }
    }

    #[test]
    fn auto_picks_json_for_objects_and_arrays_and_protobuf_otherwise() {
        assert_eq!(resolve_format(PayloadFormat::Auto, b"  {\"a\":1}"), PayloadFormat::Json);
        assert_eq!(resolve_format(PayloadFormat::Auto, b"\n[]"), PayloadFormat::Json);
        assert_eq!(resolve_format(PayloadFormat::Auto, &[0x0a, 0x00]), PayloadFormat::Protobuf);
        assert_eq!(resolve_format(PayloadFormat::Json, &[0x0a]), PayloadFormat::Json);
    }

    #[test]
    fn failed_decode_leaves_output_untouched() {
        let mut out = Vec::new();
        decode(PayloadFormat::Json, br#"{"seq":1,"t":1}"#, &ctx(), &mut out).unwrap();
        let err = decode(PayloadFormat::Json, br#"[{"seq":2},{"seq":-1}]"#, &ctx(), &mut out);
        assert!(err.is_err());
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn auto_explains_text_that_is_neither_json_nor_protobuf() {
        let mut out = Vec::new();
        let err = decode(PayloadFormat::Auto, b"temp=21", &ctx(), &mut out).unwrap_err();
        assert!(matches!(err, PayloadError::NotJsonNorProtobuf(_)), "{err}");
        let err = decode(PayloadFormat::Protobuf, b"temp=21", &ctx(), &mut out).unwrap_err();
        assert!(matches!(err, PayloadError::Protobuf(_)), "{err}");
    }

    #[test]
    fn keep_raw_copies_the_payload() {
        let mut c = ctx();
        c.keep_raw = true;
        let mut out = Vec::new();
        decode(PayloadFormat::Auto, br#"{"t":1}"#, &c, &mut out).unwrap();
        assert_eq!(out[0].raw, br#"{"t":1}"#);
    }
}
