//! The end-to-end verifier: what a sink holds, per device, against what the devices were told
//! was acknowledged. [`verdict`] is the pure comparison; [`kafka`] reads a topic back,
//! [`postgres`] and [`sqlite`] a table.

pub mod kafka;
pub mod postgres;
pub mod sqlite;

use std::borrow::Cow;
use std::collections::BTreeMap;

use prost::Message;
use serde::Serialize;
use weir_proto::Record;

use crate::kafka::JSON_CONTENT_TYPE;
use crate::report::DeviceCounts;

/// Lost-seq ranges listed per device row; the count is always complete.
const LOST_RANGES_SHOWN: usize = 5;

/// Everything read back from a sink: every seq seen per device, in the order read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    /// Messages read, decodable or not.
    pub messages: u64,
    /// Seqs per device id, duplicates included.
    pub devices: BTreeMap<String, Vec<u64>>,
    /// Messages that decoded but carried no seq (nothing to check them against).
    pub without_seq: u64,
    /// Messages that did not decode; [`Found::first_undecodable`] says why.
    pub undecodable: u64,
    pub first_undecodable: Option<String>,
}

impl Found {
    /// Counts one decoded message.
    pub fn record(&mut self, device_id: &str, seq: Option<u64>) {
        self.messages += 1;
        let Some(seq) = seq else {
            self.without_seq += 1;
            return;
        };
        match self.devices.get_mut(device_id) {
            Some(seqs) => seqs.push(seq),
            None => {
                self.devices.insert(device_id.to_owned(), vec![seq]);
            }
        }
    }

    /// Counts one message that did not decode.
    pub fn record_undecodable(&mut self, reason: impl FnOnce() -> String) {
        self.messages += 1;
        self.undecodable += 1;
        if self.first_undecodable.is_none() {
            self.first_undecodable = Some(reason());
        }
    }
}

/// Why a message's value could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    Protobuf(String),
    Json(String),
    /// Neither the value nor the key names the device.
    NoDeviceId,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Protobuf(reason) => write!(f, "not a protobuf weir.v1.Record: {reason}"),
            Self::Json(reason) => write!(f, "not a JSON record: {reason}"),
            Self::NoDeviceId => f.write_str("no device id in the value and no key"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Device id and seq of one sink message, as weir's Kafka sink writes it: the value is JSON when
/// `content_type` is `application/json` (parameters allowed), a protobuf `weir.v1.Record`
/// otherwise (the default, also when the header is missing). The device id comes from the value
/// and falls back to the key (UTF-8) when the value's is empty.
///
/// JSON values need `device_id` (or `deviceId`) and `seq`, a number or a decimal string (proto3
/// JSON writes 64-bit integers as strings); a missing or null `seq` is `None`.
pub fn decode_message(
    key: Option<&[u8]>,
    content_type: Option<&[u8]>,
    value: &[u8],
) -> Result<(String, Option<u64>), DecodeError> {
    let is_json = content_type.is_some_and(|ct| {
        let media_type = ct.split(|&b| b == b';').next().unwrap_or_default();
        media_type.trim_ascii().eq_ignore_ascii_case(JSON_CONTENT_TYPE.as_bytes())
    });
    let (device_id, seq) = if is_json { decode_json(value)? } else { decode_protobuf(value)? };
    let device_id = match device_id {
        Some(id) if !id.is_empty() => id,
        _ => match key.map(String::from_utf8_lossy) {
            Some(key) if !key.is_empty() => key.into_owned(),
            _ => return Err(DecodeError::NoDeviceId),
        },
    };
    Ok((device_id, seq))
}

fn decode_protobuf(value: &[u8]) -> Result<(Option<String>, Option<u64>), DecodeError> {
    let record = Record::decode(value).map_err(|e| DecodeError::Protobuf(e.to_string()))?;
    Ok((Some(record.device_id), record.seq))
}

fn decode_json(value: &[u8]) -> Result<(Option<String>, Option<u64>), DecodeError> {
    let json: serde_json::Value =
        serde_json::from_slice(value).map_err(|e| DecodeError::Json(e.to_string()))?;
    let object = json.as_object().ok_or_else(|| DecodeError::Json("not an object".into()))?;
    let device_id = match object.get("device_id").or_else(|| object.get("deviceId")) {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(id)) => Some(id.clone()),
        Some(other) => return Err(DecodeError::Json(format!("device_id is not a string: {other}"))),
    };
    let seq = match object.get("seq") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Number(n)) => {
            Some(n.as_u64().ok_or_else(|| DecodeError::Json(format!("seq {n} is not a u64")))?)
        }
        Some(serde_json::Value::String(s)) => {
            Some(s.parse().map_err(|_| DecodeError::Json(format!("seq {s:?} is not a u64")))?)
        }
        Some(other) => return Err(DecodeError::Json(format!("seq is not a number: {other}"))),
    };
    Ok((device_id, seq))
}

/// The comparison of what devices were acknowledged against what a sink holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub totals: Totals,
    /// One row per checked device, in device id order.
    pub devices: Vec<DeviceVerdict>,
}

impl Verdict {
    /// Nothing acknowledged is missing. Duplicates do not fail a run: at-least-once delivery
    /// allows them, and consumers drop them by `(device_id, seq)`.
    pub fn passed(&self) -> bool {
        self.totals.lost == 0
    }

    /// One human-readable line: `SUMMARY {name}: ok|LOST RECORDS: lost=… duplicates=… …`.
    pub fn summary_line(&self, name: &str) -> String {
        let t = &self.totals;
        let mut line = format!(
            "SUMMARY {name}: {}: lost={} duplicates={} acked={} found={} devices={} unexpected={}",
            if self.passed() { "ok" } else { "LOST RECORDS" },
            t.lost,
            t.duplicates,
            t.acked,
            t.found,
            t.devices,
            t.unexpected
        );
        if t.undecodable > 0 || t.without_seq > 0 {
            line.push_str(&format!("; WARNING undecodable={} without_seq={}", t.undecodable, t.without_seq));
        }
        if t.other_devices > 0 {
            line.push_str(&format!(
                "; {} messages of {} devices not in the expected counts",
                t.other_messages, t.other_devices
            ));
        }
        line
    }

    /// Rows of devices that lost something, at most `limit`.
    pub fn lossy_devices(&self, limit: usize) -> impl Iterator<Item = &DeviceVerdict> {
        self.devices.iter().filter(|d| d.lost > 0).take(limit)
    }
}

/// Sums over the checked devices, plus what was found for no checked device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Devices checked: those expected, or every device found when nothing was expected.
    pub devices: u64,
    pub sent: u64,
    /// Sum of `acked_through`: records the sink must hold.
    pub acked: u64,
    /// Messages found for checked devices, duplicates included.
    pub found: u64,
    pub distinct: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub unexpected: u64,
    /// Devices found that were not expected (other runs writing to the same topic), and their
    /// messages; not checked.
    pub other_devices: u64,
    pub other_messages: u64,
    pub without_seq: u64,
    pub undecodable: u64,
}

/// One device: what it sent and had acknowledged, what the sink holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceVerdict {
    pub device_id: String,
    pub sent: u64,
    pub acked_through: u64,
    /// Messages found, duplicates included.
    pub found: u64,
    /// Distinct seqs found.
    pub distinct: u64,
    /// `found - distinct`.
    pub duplicates: u64,
    /// Seqs in `1..=acked_through` not found.
    pub lost: u64,
    /// Distinct seqs found outside `1..=sent`: never published by this run.
    pub unexpected: u64,
    /// The first few runs of lost seqs, inclusive.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lost_ranges: Vec<(u64, u64)>,
}

/// Compares `expected` (from `--devices-in`, the flood's per-device counts) with what a sink
/// holds. With no expectations every device found is checked for duplicates only.
pub fn verdict(expected: &DeviceCounts, found: &Found) -> Verdict {
    let mut totals =
        Totals { without_seq: found.without_seq, undecodable: found.undecodable, ..Totals::default() };
    let mut devices = Vec::new();
    if expected.is_empty() {
        for (device_id, seqs) in &found.devices {
            devices.push(device_verdict(device_id, Default::default(), seqs));
        }
    } else {
        for (device_id, count) in expected {
            let seqs = found.devices.get(device_id).map_or(&[][..], Vec::as_slice);
            devices.push(device_verdict(device_id, *count, seqs));
        }
        for (device_id, seqs) in &found.devices {
            if !expected.contains_key(device_id) {
                totals.other_devices += 1;
                totals.other_messages += seqs.len() as u64;
            }
        }
    }
    for device in &devices {
        totals.devices += 1;
        totals.sent += device.sent;
        totals.acked += device.acked_through;
        totals.found += device.found;
        totals.distinct += device.distinct;
        totals.lost += device.lost;
        totals.duplicates += device.duplicates;
        totals.unexpected += device.unexpected;
    }
    Verdict { totals, devices }
}

fn device_verdict(device_id: &str, expected: crate::report::DeviceCount, seqs: &[u64]) -> DeviceVerdict {
    let sorted: Cow<'_, [u64]> = if seqs.is_sorted() {
        Cow::Borrowed(seqs)
    } else {
        let mut owned = seqs.to_vec();
        owned.sort_unstable();
        Cow::Owned(owned)
    };
    let mut distinct = 0u64;
    let mut unexpected = 0u64;
    let mut lost_ranges = Vec::new();
    let mut lost = 0u64;
    // The next seq of 1..=acked_through still to be found.
    let mut next_wanted = 1u64;
    let mut previous = None;
    for &seq in sorted.iter() {
        if previous == Some(seq) {
            continue;
        }
        previous = Some(seq);
        distinct += 1;
        if seq == 0 || seq > expected.sent {
            unexpected += 1;
        }
        if seq >= next_wanted && next_wanted <= expected.acked_through {
            let gap_end = (seq - 1).min(expected.acked_through);
            if seq > next_wanted {
                note_lost(&mut lost, &mut lost_ranges, next_wanted, gap_end);
            }
            next_wanted = seq.saturating_add(1);
        }
    }
    if next_wanted <= expected.acked_through {
        note_lost(&mut lost, &mut lost_ranges, next_wanted, expected.acked_through);
    }
    DeviceVerdict {
        device_id: device_id.to_owned(),
        sent: expected.sent,
        acked_through: expected.acked_through,
        found: seqs.len() as u64,
        distinct,
        duplicates: seqs.len() as u64 - distinct,
        lost,
        unexpected,
        lost_ranges,
    }
}

fn note_lost(lost: &mut u64, ranges: &mut Vec<(u64, u64)>, first: u64, last: u64) {
    *lost += last - first + 1;
    if ranges.len() < LOST_RANGES_SHOWN {
        ranges.push((first, last));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::PROTOBUF_CONTENT_TYPE;
    use crate::report::DeviceCount;
    use weir_proto::{metric_value::Kind, MetricValue, SourceProtocol};

    fn expected(rows: &[(&str, u64, u64)]) -> DeviceCounts {
        rows.iter()
            .map(|&(id, sent, acked_through)| (id.to_owned(), DeviceCount { sent, acked_through }))
            .collect()
    }

    fn found(rows: &[(&str, &[u64])]) -> Found {
        let mut found = Found::default();
        for (id, seqs) in rows {
            for &seq in *seqs {
                found.record(id, Some(seq));
            }
        }
        found
    }

    #[test]
    fn everything_acked_found_once_passes() {
        let v = verdict(&expected(&[("a", 3, 3), ("b", 2, 2)]), &found(&[("b", &[2, 1]), ("a", &[1, 2, 3])]));
        assert!(v.passed());
        let t = &v.totals;
        assert_eq!((t.devices, t.sent, t.acked, t.found, t.distinct), (2, 5, 5, 5, 5));
        assert_eq!((t.lost, t.duplicates, t.unexpected, t.other_devices), (0, 0, 0, 0));
        assert_eq!(v.lossy_devices(20).count(), 0);
    }

    #[test]
    fn lost_counts_only_acked_seqs_and_names_the_gaps() {
        // Sent 10, acked through 8: 9 and 10 may be missing; 2, 5..=6 and 8 may not.
        let v = verdict(&expected(&[("a", 10, 8)]), &found(&[("a", &[1, 3, 4, 7, 10])]));
        assert!(!v.passed());
        let row = &v.devices[0];
        assert_eq!(row.lost, 4);
        assert_eq!(row.lost_ranges, vec![(2, 2), (5, 6), (8, 8)]);
        assert_eq!((row.distinct, row.duplicates, row.unexpected), (5, 0, 0));
        assert_eq!(v.totals.lost, 4);
    }

    #[test]
    fn a_device_with_nothing_found_lost_all_it_had_acked() {
        let v = verdict(&expected(&[("a", 5, 4), ("quiet", 0, 0)]), &Found::default());
        assert_eq!(v.devices[0].lost, 4);
        assert_eq!(v.devices[0].lost_ranges, vec![(1, 4)]);
        assert_eq!(v.devices[1].lost, 0);
        assert_eq!(v.totals.devices, 2);
        assert_eq!(v.lossy_devices(20).map(|d| d.device_id.as_str()).collect::<Vec<_>>(), ["a"]);
    }

    #[test]
    fn duplicates_and_unexpected_seqs_are_counted_but_pass() {
        let v = verdict(&expected(&[("a", 3, 3)]), &found(&[("a", &[1, 2, 2, 3, 3, 3, 4, 0])]));
        let row = &v.devices[0];
        assert_eq!((row.found, row.distinct, row.duplicates), (8, 5, 3));
        assert_eq!(row.unexpected, 2, "seq 0 and seq 4 were never sent");
        assert_eq!(row.lost, 0);
        assert!(v.passed());
    }

    #[test]
    fn other_devices_are_reported_apart_and_not_checked() {
        let v = verdict(&expected(&[("a", 1, 1)]), &found(&[("a", &[1]), ("old-run-1", &[1, 2, 2])]));
        assert_eq!((v.totals.other_devices, v.totals.other_messages), (1, 3));
        assert_eq!((v.totals.devices, v.totals.found, v.totals.duplicates), (1, 1, 0));
    }

    #[test]
    fn without_expectations_every_found_device_is_checked_for_duplicates() {
        let mut f = found(&[("a", &[1, 1]), ("b", &[5])]);
        f.record("a", None);
        f.record_undecodable(|| "bad".into());
        let v = verdict(&DeviceCounts::new(), &f);
        assert_eq!((v.totals.devices, v.totals.found, v.totals.duplicates, v.totals.lost), (2, 3, 1, 0));
        assert_eq!((v.totals.without_seq, v.totals.undecodable), (1, 1));
        assert_eq!(f.messages, 5);
        assert_eq!(f.first_undecodable.as_deref(), Some("bad"));
    }

    #[test]
    fn lost_ranges_are_capped_but_the_count_is_not() {
        let seqs: Vec<u64> = (1..=40).step_by(2).collect(); // every even seq is missing
        let v = verdict(&expected(&[("a", 40, 40)]), &found(&[("a", &seqs)]));
        assert_eq!(v.devices[0].lost, 20);
        assert_eq!(v.devices[0].lost_ranges.len(), LOST_RANGES_SHOWN);
    }

    #[test]
    fn summary_line_says_ok_or_lost_with_the_counts() {
        let ok = verdict(&expected(&[("a", 2, 2)]), &found(&[("a", &[1, 2, 2]), ("z", &[1])]));
        assert_eq!(
            ok.summary_line("qos1-kafka-verify weir"),
            "SUMMARY qos1-kafka-verify weir: ok: lost=0 duplicates=1 acked=2 found=3 devices=1 unexpected=0; \
             1 messages of 1 devices not in the expected counts"
        );
        let mut f = found(&[("a", &[2])]);
        f.record_undecodable(|| "x".into());
        let lost = verdict(&expected(&[("a", 2, 2)]), &f).summary_line("v");
        assert_eq!(
            lost,
            "SUMMARY v: LOST RECORDS: lost=1 duplicates=0 acked=2 found=1 devices=1 unexpected=0; \
             WARNING undecodable=1 without_seq=0"
        );
    }

    #[test]
    fn verdict_serialises_totals_and_rows() {
        let v = verdict(&expected(&[("a", 2, 2)]), &found(&[("a", &[2])]));
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["totals"]["lost"], 1);
        assert_eq!(json["devices"][0]["device_id"], "a");
        assert_eq!(json["devices"][0]["lost_ranges"], serde_json::json!([[1, 1]]));
    }

    fn record(device_id: &str, seq: Option<u64>) -> Record {
        Record {
            device_id: device_id.into(),
            seq,
            device_ts_ms: Some(1_700_000_000_000),
            received_ts_ms: 1_700_000_000_005,
            protocol: SourceProtocol::Mqtt as i32,
            source: format!("devices/{device_id}/telemetry"),
            metrics: [("temp".to_owned(), MetricValue { kind: Some(Kind::Number(21.5)) })].into(),
            tags: Default::default(),
            raw: Vec::new(),
        }
    }

    #[test]
    fn decodes_protobuf_records_by_default_and_by_content_type() {
        let value = record("dev-1", Some(42)).encode_to_vec();
        let expected = Ok(("dev-1".to_owned(), Some(42)));
        assert_eq!(decode_message(Some(b"dev-1"), Some(PROTOBUF_CONTENT_TYPE.as_bytes()), &value), expected);
        assert_eq!(decode_message(None, None, &value), expected);
        assert_eq!(decode_message(None, Some(b"application/octet-stream"), &value), expected);
    }

    #[test]
    fn protobuf_without_device_id_takes_the_key_and_without_seq_is_none() {
        let value = record("", None).encode_to_vec();
        assert_eq!(decode_message(Some(b"from-key"), None, &value), Ok(("from-key".to_owned(), None)));
        assert_eq!(decode_message(None, None, &value), Err(DecodeError::NoDeviceId));
        assert_eq!(decode_message(Some(b""), None, &value), Err(DecodeError::NoDeviceId));
    }

    #[test]
    fn decodes_json_records_with_numeric_or_string_seqs() {
        let ct = Some(JSON_CONTENT_TYPE.as_bytes());
        let full = br#"{"device_id":"d-9","seq":7,"device_ts_ms":1,"metrics":{"temp":21.5}}"#;
        assert_eq!(decode_message(Some(b"d-9"), ct, full), Ok(("d-9".to_owned(), Some(7))));
        let proto3_json = br#"{"deviceId":"d-9","seq":"18446744073709551615"}"#;
        assert_eq!(decode_message(None, ct, proto3_json), Ok(("d-9".to_owned(), Some(u64::MAX))));
        let with_params = Some(&b"Application/JSON; charset=utf-8"[..]);
        assert_eq!(decode_message(Some(b"k"), with_params, br#"{"seq":3}"#), Ok(("k".to_owned(), Some(3))));
        assert_eq!(
            decode_message(Some(b"k"), ct, br#"{"device_id":"","seq":null}"#),
            Ok(("k".to_owned(), None))
        );
    }

    #[test]
    fn rejects_values_that_do_not_match_their_content_type() {
        let ct = Some(JSON_CONTENT_TYPE.as_bytes());
        let protobuf = record("d", Some(1)).encode_to_vec();
        assert!(matches!(decode_message(Some(b"d"), ct, &protobuf), Err(DecodeError::Json(_))));
        assert!(matches!(decode_message(Some(b"d"), ct, b"[1,2]"), Err(DecodeError::Json(_))));
        assert!(matches!(decode_message(Some(b"d"), ct, br#"{"seq":-1}"#), Err(DecodeError::Json(_))));
        assert!(matches!(decode_message(Some(b"d"), ct, br#"{"seq":1.5}"#), Err(DecodeError::Json(_))));
        assert!(matches!(decode_message(Some(b"d"), ct, br#"{"device_id":7}"#), Err(DecodeError::Json(_))));
        let json = br#"{"device_id":"d","seq":1}"#;
        assert!(matches!(decode_message(Some(b"d"), None, json), Err(DecodeError::Protobuf(_))));
    }
}
