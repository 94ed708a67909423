//! Builds one simulated device's JSON telemetry messages, padded to an exact size.

use std::io::Write;

/// Metric values every simulated reading carries; fixed so payloads differ only in seq, ts, pad.
pub const TEMP: f64 = 21.5;
pub const HUM: f64 = 40.1;

/// What closes every message after the pad.
const TAIL: &[u8] = br#""}}"#;

/// Writes `{"device_id":…,"seq":…,"ts":…,"metrics":{"temp":…,"hum":…,"pad":"xxx…"}}` messages
/// in weir's device JSON format for one device, padded with the `pad` metric so each message is
/// `target_bytes` long.
#[derive(Debug, Clone)]
pub struct TelemetryPayload {
    device_id: String,
    target_bytes: usize,
}

impl TelemetryPayload {
    /// `device_id` must not need JSON escaping (the CLI restricts it to `[A-Za-z0-9_.-]`).
    pub fn new(device_id: String, target_bytes: usize) -> Self {
        Self { device_id, target_bytes }
    }

    /// One message. It is longer than `target_bytes` only when the unpadded message already is
    /// (see [`TelemetryPayload::min_len`]); then `pad` is empty.
    pub fn build(&self, seq: u64, ts_ms: u64) -> Vec<u8> {
        let mut message = Vec::with_capacity(self.target_bytes.max(96));
        // Writing into a Vec cannot fail.
        let _ = write!(
            message,
            r#"{{"device_id":"{}","seq":{seq},"ts":{ts_ms},"metrics":{{"temp":{TEMP},"hum":{HUM},"pad":""#,
            self.device_id
        );
        let pad = self.target_bytes.saturating_sub(message.len() + TAIL.len());
        message.resize(message.len() + pad, b'x');
        message.extend_from_slice(TAIL);
        message
    }

    /// Length of the `pad` metric in [`TelemetryPayload::build`]`(seq, ts_ms)`, without building
    /// the message (the raw Kafka producer fills the same pad into its records).
    pub fn pad_len(&self, seq: u64, ts_ms: u64) -> usize {
        // Everything but the two numbers and the pad is fixed for this device.
        let fixed = r#"{"device_id":"","seq":,"ts":,"metrics":{"temp":,"hum":,"pad":""#.len()
            + self.device_id.len()
            + TEMP.to_string().len()
            + HUM.to_string().len()
            + TAIL.len();
        self.target_bytes.saturating_sub(fixed + decimal_digits(seq) + decimal_digits(ts_ms))
    }

    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// Length of the message with an empty pad, for the largest seq a run can plausibly reach
    /// and a 13-digit millisecond timestamp; a `target_bytes` below this cannot be honoured.
    pub fn min_len(&self) -> usize {
        let unpadded = Self::new(self.device_id.clone(), 0);
        unpadded.build(99_999_999, 1_700_000_000_000).len()
    }
}

fn decimal_digits(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |log| log as usize + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pad_len_matches_the_built_message() {
        for target in [0, 10, 96, 128, 1000] {
            let payload = TelemetryPayload::new("load-1700000000-42".into(), target);
            for (seq, ts) in [(1, 0), (9, 1_700_000_000_000), (10, 99), (123_456_789, u64::MAX), (0, 1)] {
                let message = payload.build(seq, ts);
                let value: serde_json::Value = serde_json::from_slice(&message).unwrap();
                let pad = value["metrics"]["pad"].as_str().unwrap();
                assert_eq!(payload.pad_len(seq, ts), pad.len(), "target {target} seq {seq} ts {ts}");
            }
        }
    }

    #[test]
    fn message_is_padded_to_the_exact_size() {
        let payload = TelemetryPayload::new("load-1700000000-7".into(), 128);
        for (seq, ts) in [(1, 1_700_000_000_000), (123_456, 1_700_000_000_123)] {
            let message = payload.build(seq, ts);
            assert_eq!(message.len(), 128);
            let value: serde_json::Value = serde_json::from_slice(&message).unwrap();
            assert_eq!(value["device_id"], "load-1700000000-7");
            assert_eq!(value["seq"], seq);
            assert_eq!(value["ts"], ts);
            assert_eq!(value["metrics"]["temp"], 21.5);
            assert_eq!(value["metrics"]["hum"], 40.1);
            let pad = value["metrics"]["pad"].as_str().unwrap();
            assert!(pad.bytes().all(|b| b == b'x'));
        }
    }

    #[test]
    fn too_small_a_target_gives_an_empty_pad() {
        let payload = TelemetryPayload::new("d".into(), 10);
        let message = payload.build(1, 2);
        assert_eq!(
            message,
            br#"{"device_id":"d","seq":1,"ts":2,"metrics":{"temp":21.5,"hum":40.1,"pad":""}}"#
        );
        assert!(payload.min_len() > 10);
    }

    #[test]
    fn min_len_is_the_unpadded_length_at_large_seq() {
        let payload = TelemetryPayload::new("dev-x".into(), 4096);
        let unpadded = TelemetryPayload::new("dev-x".into(), 0);
        assert_eq!(payload.min_len(), unpadded.build(99_999_999, 1_700_000_000_000).len());
    }
}
