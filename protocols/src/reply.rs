//! The answer to one device message on WebSocket, raw TCP and HTTP: an ack after the commit, or
//! an error with its reason. One encoding as JSON (`{"ack":7,"n":3}`) and one as protobuf
//! (`weir.v1.Ack`), chosen by how the device sent the message.

use prost::Message as _;
use weir_proto::{Ack, AckStatus};

/// What happened to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Every record of it is committed (or buffered, per the listener's ack point).
    Ok,
    /// Not decodable: stored as a dead letter with the reason; do not resend as is.
    Undecodable,
    /// Larger than the listener's limit: not stored.
    TooLarge,
    /// The device may not send there: not stored.
    NotAuthorized,
    /// Not stored (fabric full under `drop_newest`, or the sink gave up): resend later.
    Unavailable,
}

impl Status {
    /// The name used in JSON replies and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Undecodable => "undecodable",
            Status::TooLarge => "too_large",
            Status::NotAuthorized => "not_authorized",
            Status::Unavailable => "unavailable",
        }
    }

    fn proto(self) -> AckStatus {
        match self {
            Status::Ok => AckStatus::Ok,
            Status::Undecodable => AckStatus::Undecodable,
            Status::TooLarge => AckStatus::TooLarge,
            Status::NotAuthorized => AckStatus::NotAuthorized,
            Status::Unavailable => AckStatus::Unavailable,
        }
    }
}

/// How the reply is encoded: as the device's message was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyFormat {
    Json,
    Protobuf,
}

/// The answer to message number `n` of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The message's position on its connection, from 1.
    pub n: u64,
    /// The largest `seq` among the message's readings, if any had one.
    pub seq: Option<u64>,
    pub status: Status,
    /// Why, when the status is not `Ok`.
    pub reason: String,
    pub format: ReplyFormat,
}

impl Reply {
    /// JSON: `{"ack":7,"n":3}` (`"ack":null` when the message had no seq), or
    /// `{"error":"undecodable","reason":"...","n":3,"seq":7}` (seq only when known).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        use std::io::Write as _;
        if self.status == Status::Ok {
            match self.seq {
                Some(seq) => {
                    let _ = write!(out, "{{\"ack\":{seq},\"n\":{}}}", self.n);
                }
                None => {
                    let _ = write!(out, "{{\"ack\":null,\"n\":{}}}", self.n);
                }
            }
            return;
        }
        let _ = write!(out, "{{\"error\":\"{}\",\"reason\":", self.status.as_str());
        let _ = serde_json::to_writer(&mut *out, &self.reason);
        let _ = write!(out, ",\"n\":{}", self.n);
        if let Some(seq) = self.seq {
            let _ = write!(out, ",\"seq\":{seq}");
        }
        out.push(b'}');
    }

    pub fn to_proto(&self) -> Ack {
        Ack { seq: self.seq, status: self.status.proto() as i32, reason: self.reason.clone(), n: self.n }
    }

    /// Appends the protobuf `Ack` (without any framing).
    pub fn write_proto(&self, out: &mut Vec<u8>) {
        // Writing into a Vec cannot run out of room.
        let _ = self.to_proto().encode(out);
    }

    /// Appends the reply in its format.
    pub fn write(&self, out: &mut Vec<u8>) {
        match self.format {
            ReplyFormat::Json => self.write_json(out),
            ReplyFormat::Protobuf => self.write_proto(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(seq: Option<u64>, status: Status, reason: &str) -> Reply {
        Reply { n: 3, seq, status, reason: reason.into(), format: ReplyFormat::Json }
    }

    fn json(r: &Reply) -> String {
        let mut out = Vec::new();
        r.write_json(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn json_acks_and_errors() {
        assert_eq!(json(&reply(Some(7), Status::Ok, "")), r#"{"ack":7,"n":3}"#);
        assert_eq!(json(&reply(None, Status::Ok, "")), r#"{"ack":null,"n":3}"#);
        assert_eq!(
            json(&reply(None, Status::Undecodable, "invalid JSON: \"x\"")),
            r#"{"error":"undecodable","reason":"invalid JSON: \"x\"","n":3}"#
        );
        let v: serde_json::Value =
            serde_json::from_str(&json(&reply(Some(9), Status::Unavailable, "full"))).unwrap();
        assert_eq!(v["error"], "unavailable");
        assert_eq!(v["seq"], 9);
    }

    #[test]
    fn protobuf_round_trips() {
        let r = reply(Some(5), Status::TooLarge, "300000 bytes, limit 262144");
        let mut out = Vec::new();
        r.write_proto(&mut out);
        let ack = Ack::decode(out.as_slice()).unwrap();
        assert_eq!(ack.seq, Some(5));
        assert_eq!(ack.n, 3);
        assert_eq!(ack.status(), AckStatus::TooLarge);
        assert_eq!(ack.reason, r.reason);
    }
}
