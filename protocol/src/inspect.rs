//! Any tierd MQTT payload as JSON, for people: what `cloud-relay decode` prints.
//!
//! Binary payloads carry their kind in the framing's second byte ([`crate::codec`]), so the
//! kind is read from the payload itself and the topic, when given, is only cross-checked (a
//! payload on the wrong topic is flagged, as the daemons would refuse it). JSON payloads (the
//! signed config and rollout envelopes) are shown with the document parsed out of the envelope;
//! the signature is **not** checked here (this tool has no trusted keys): `"signature": "not
//! checked"` says so. A spooled record's body is decoded too. Model chunks show the size of
//! their data, not the bytes. Every decode goes through [`crate::decode`], so the size limits,
//! version and canonical-form checks are those of the daemons.

use serde::Serialize;
use serde_json::{json, Value};
use thiserror::Error;

use crate::codec::WireMessage;
use crate::message::{
    ConfigAck, DeviceStatus, EscalationReply, EscalationRequest, RecordKind, SpoolAck, Spooled,
};
use crate::rollout::{ChunkBody, ModelChunk, ModelFetch, RolloutAck, ShadowReport};
use crate::telemetry::{CalibrationReport, TelemetryReport};
use crate::topic::{Topic, TopicKind};
use crate::{decode, WireError, WIRE_VERSION};

#[derive(Debug, Error)]
pub enum InspectError {
    #[error("empty payload (a cleared retained message)")]
    Empty,
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("payload starts with byte {0:#04x}: neither a tierd binary message (version {WIRE_VERSION}) nor JSON")]
    Unknown(u8),
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("JSON payload does not parse: {0}")]
    Json(String),
}

/// The message kinds by their framing byte, with their names.
fn kind_name(kind: u8) -> Option<&'static str> {
    Some(match kind {
        EscalationRequest::KIND => EscalationRequest::NAME,
        EscalationReply::KIND => EscalationReply::NAME,
        TelemetryReport::KIND => TelemetryReport::NAME,
        DeviceStatus::KIND => DeviceStatus::NAME,
        CalibrationReport::KIND => CalibrationReport::NAME,
        Spooled::KIND => Spooled::NAME,
        SpoolAck::KIND => SpoolAck::NAME,
        ConfigAck::KIND => ConfigAck::NAME,
        ModelFetch::KIND => ModelFetch::NAME,
        ModelChunk::KIND => ModelChunk::NAME,
        RolloutAck::KIND => RolloutAck::NAME,
        ShadowReport::KIND => ShadowReport::NAME,
        _ => return None,
    })
}

/// The binary kind each topic carries (None: a JSON envelope).
fn expected_kind(kind: TopicKind) -> Option<u8> {
    Some(match kind {
        TopicKind::Escalate => EscalationRequest::KIND,
        TopicKind::EscalateReply => EscalationReply::KIND,
        TopicKind::Telemetry | TopicKind::ConfigAck => Spooled::KIND,
        TopicKind::SpoolAck => SpoolAck::KIND,
        TopicKind::Status => DeviceStatus::KIND,
        TopicKind::ModelFetch => ModelFetch::KIND,
        TopicKind::ModelChunk => ModelChunk::KIND,
        TopicKind::Config | TopicKind::Rollout => return None,
    })
}

fn value<M: WireMessage + Serialize>(bytes: &[u8]) -> Result<Value, InspectError> {
    let m: M = decode(bytes)?;
    serde_json::to_value(&m).map_err(|e| InspectError::Json(e.to_string()))
}

/// One binary message by its framing byte.
fn binary(bytes: &[u8]) -> Result<(&'static str, Value), InspectError> {
    let kind = *bytes.get(1).ok_or(WireError::TooShort {
        name: "tierd message",
        len: bytes.len(),
    })?;
    let name = kind_name(kind).ok_or(InspectError::UnknownKind(kind))?;
    let v = match kind {
        EscalationRequest::KIND => value::<EscalationRequest>(bytes)?,
        EscalationReply::KIND => value::<EscalationReply>(bytes)?,
        TelemetryReport::KIND => value::<TelemetryReport>(bytes)?,
        DeviceStatus::KIND => value::<DeviceStatus>(bytes)?,
        CalibrationReport::KIND => value::<CalibrationReport>(bytes)?,
        SpoolAck::KIND => value::<SpoolAck>(bytes)?,
        ConfigAck::KIND => value::<ConfigAck>(bytes)?,
        ModelFetch::KIND => value::<ModelFetch>(bytes)?,
        RolloutAck::KIND => value::<RolloutAck>(bytes)?,
        ShadowReport::KIND => value::<ShadowReport>(bytes)?,
        ModelChunk::KIND => {
            let c: ModelChunk = decode(bytes)?;
            let body = match &c.body {
                ChunkBody::Data(d) => json!({ "data_bytes": d.len() }),
                ChunkBody::Error(e) => json!({ "error": e }),
            };
            json!({ "sha256": c.sha256, "offset": c.offset, "total": c.total, "body": body })
        }
        Spooled::KIND => {
            let s: Spooled = decode(bytes)?;
            let body = match record(s.kind, &s.body) {
                Ok(v) => v,
                Err(e) => json!({ "error": e.to_string(), "bytes": s.body.len() }),
            };
            json!({
                "stream_id": s.stream_id, "seq": s.seq, "floor": s.floor,
                "kind": s.kind, "body": body,
            })
        }
        other => return Err(InspectError::UnknownKind(other)),
    };
    Ok((name, v))
}

/// A spooled record's body, by the envelope's kind.
fn record(kind: RecordKind, body: &[u8]) -> Result<Value, InspectError> {
    match kind {
        RecordKind::Telemetry => value::<TelemetryReport>(body),
        RecordKind::Calibration => value::<CalibrationReport>(body),
        RecordKind::ConfigAck => value::<ConfigAck>(body),
        RecordKind::RolloutAck => value::<RolloutAck>(body),
        RecordKind::Shadow => value::<ShadowReport>(body),
    }
}

/// A signed JSON envelope (config or rollout document), its document parsed out, unverified.
fn envelope(bytes: &[u8]) -> Result<(&'static str, Value), InspectError> {
    let mut v: Value =
        serde_json::from_slice(bytes).map_err(|e| InspectError::Json(e.to_string()))?;
    let name = match v.get("doc").and_then(Value::as_str) {
        Some(doc) => {
            let parsed: Value =
                serde_json::from_str(doc).map_err(|e| InspectError::Json(e.to_string()))?;
            let name = if parsed.get("stage").is_some() || parsed.get("release").is_some() {
                "signed rollout document"
            } else {
                "signed config document"
            };
            v["doc"] = parsed;
            v["signature"] = json!("not checked");
            name
        }
        None => "JSON",
    };
    Ok((name, v))
}

/// `payload` (as published on `topic`, if known) as `{"topic", "device", "message", "kind"}`,
/// plus `"warning"` when the payload is not what its topic carries.
pub fn to_json(topic: Option<&str>, payload: &[u8]) -> Result<Value, InspectError> {
    let first = *payload.first().ok_or(InspectError::Empty)?;
    let (name, message) = match first {
        WIRE_VERSION => binary(payload)?,
        b'{' | b' ' | b'\n' | b'\t' => envelope(payload)?,
        other => return Err(InspectError::Unknown(other)),
    };
    let mut out = json!({ "kind": name, "message": message });
    if let Some(t) = topic {
        out["topic"] = json!(t);
        match Topic::parse(t) {
            Ok(parsed) => {
                out["device"] = json!(parsed.device_id);
                let expected = expected_kind(parsed.kind);
                let got = (first == WIRE_VERSION).then(|| payload[1]);
                if expected != got {
                    out["warning"] = json!(format!(
                        "a {} on a {} topic: the daemons refuse it",
                        name,
                        parsed.kind.suffix()
                    ));
                }
            }
            Err(e) => out["warning"] = json!(format!("not a tierd topic: {e}")),
        }
    }
    Ok(out)
}

/// One line of `mosquitto_sub -F '%t %x'`: the topic, if the line has one, and the payload.
pub type HexLine<'a> = (Option<&'a str>, Vec<u8>);

/// Parses one line of `mosquitto_sub -F '%t %x'` (topic, space, payload in hex) or a bare hex
/// payload. `None` for a blank line.
pub fn parse_hex_line(line: &str) -> Option<Result<HexLine<'_>, String>> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    let (topic, hex_text) = match line.rsplit_once(' ') {
        Some((t, h)) => (Some(t.trim()), h),
        None => (None, line),
    };
    Some(
        hex::decode(hex_text)
            .map(|b| (topic, b))
            .map_err(|e| format!("payload is not hex ({e}): use mosquitto_sub -F '%t %x'")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode;

    fn status() -> DeviceStatus {
        DeviceStatus {
            online: true,
            boot_id: 7,
            reason: String::new(),
            model: None,
            models: Vec::new(),
            machine: Some("00aa".into()),
        }
    }

    #[test]
    fn a_status_on_its_topic() {
        let v = to_json(Some("tierd/v1/pi-7/status"), &encode(&status()).unwrap()).unwrap();
        assert_eq!(v["kind"], "device status");
        assert_eq!(v["device"], "pi-7");
        assert_eq!(v["message"]["boot_id"], 7);
        assert_eq!(v["message"]["machine"], "00aa");
        assert!(v.get("warning").is_none());
    }

    #[test]
    fn a_payload_on_the_wrong_topic_is_flagged() {
        let v = to_json(Some("tierd/v1/pi-7/ack"), &encode(&status()).unwrap()).unwrap();
        assert!(v["warning"].as_str().unwrap().contains("refuse"), "{v}");
    }

    #[test]
    fn a_spooled_record_shows_its_body() {
        let ack = ConfigAck {
            version: 3,
            applied: false,
            reason: "stale".into(),
            in_force: 2,
        };
        let s = Spooled {
            stream_id: 1,
            seq: 5,
            floor: 0,
            kind: RecordKind::ConfigAck,
            body: encode(&ack).unwrap(),
        };
        let v = to_json(Some("tierd/v1/d/config/ack"), &encode(&s).unwrap()).unwrap();
        assert_eq!(v["message"]["seq"], 5);
        assert_eq!(v["message"]["body"]["reason"], "stale");
        // A body that is not what the envelope says is shown as an error, not hidden.
        let bad = Spooled {
            kind: RecordKind::Telemetry,
            ..s
        };
        let v = to_json(None, &encode(&bad).unwrap()).unwrap();
        assert!(v["message"]["body"]["error"].is_string(), "{v}");
    }

    #[test]
    fn bad_payloads_say_why() {
        assert!(matches!(to_json(None, b""), Err(InspectError::Empty)));
        assert!(matches!(
            to_json(None, b"\x07\x01"),
            Err(InspectError::Unknown(7))
        ));
        assert!(matches!(
            to_json(None, &[WIRE_VERSION, 99]),
            Err(InspectError::UnknownKind(99))
        ));
        let mut b = encode(&status()).unwrap();
        b.push(0);
        let e = to_json(None, &b).unwrap_err().to_string();
        assert!(e.contains("trailing"), "{e}");
        assert!(to_json(None, b"{nope").is_err());
    }

    #[test]
    fn a_signed_envelope_shows_its_document_unverified() {
        let payload = br#"{"alg":"ed25519","key_id":"ab","doc":"{\"version\":7,\"device_id\":\"d\"}","sig":"00"}"#;
        let v = to_json(Some("tierd/v1/d/config"), payload).unwrap();
        assert_eq!(v["kind"], "signed config document");
        assert_eq!(v["message"]["doc"]["version"], 7);
        assert_eq!(v["message"]["signature"], "not checked");
        assert!(v.get("warning").is_none());
    }

    #[test]
    fn hex_lines_as_mosquitto_sub_prints_them() {
        let (t, b) = parse_hex_line("tierd/v1/d/status 0304").unwrap().unwrap();
        assert_eq!((t, b), (Some("tierd/v1/d/status"), vec![3, 4]));
        let (t, b) = parse_hex_line("0304\n").unwrap().unwrap();
        assert_eq!((t, b.len()), (None, 2));
        assert!(parse_hex_line("   ").is_none());
        assert!(parse_hex_line("t zz").unwrap().is_err());
    }
}
