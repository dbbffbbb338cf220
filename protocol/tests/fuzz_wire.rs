//! Property tests of the wire codec, the first thing that touches bytes from the network.
//! 100,000 cases per property by default (`PROPTEST_CASES` overrides, e.g. 10,000,000 for a
//! long run); each property also holds for the bytes proptest shrinks a failure to.

use proptest::prelude::*;
use tierd_protocol::{
    decode, encode, ConfigAck, ConfigDocument, DeviceStatus, EscalationKind, EscalationReply,
    EscalationRequest, ReplyErrorCode, ReplyOutcome, SpoolAck, Spooled, TelemetryReport, Tensor,
    TensorData, WIRE_VERSION,
};

// Shared with the other crates' fuzz suites (std only, so included rather than depended on).
#[path = "../../devkit/src/fuzz.rs"]
mod fuzz;
use fuzz::cases;

/// Decodes `bytes` as every message type. Whatever decodes must re-encode to the same bytes:
/// one payload has exactly one meaning.
fn check_all(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(m) = decode::<EscalationRequest>(bytes) {
        let again = encode(&m).ok();
        prop_assert_eq!(again.as_deref(), Some(bytes));
    }
    if let Ok(m) = decode::<EscalationReply>(bytes) {
        let again = encode(&m).ok();
        prop_assert_eq!(again.as_deref(), Some(bytes));
    }
    if let Ok(m) = decode::<TelemetryReport>(bytes) {
        let again = encode(&m).ok();
        prop_assert_eq!(again.as_deref(), Some(bytes));
    }
    if let Ok(m) = decode::<DeviceStatus>(bytes) {
        let again = encode(&m).ok();
        prop_assert_eq!(again.as_deref(), Some(bytes));
    }
    if let Ok(m) = decode::<Spooled>(bytes) {
        let again = encode(&m).ok();
        prop_assert_eq!(again.as_deref(), Some(bytes));
        check_all(&m.body)?;
    }
    if let Ok(m) = decode::<SpoolAck>(bytes) {
        let again = encode(&m).ok();
        prop_assert_eq!(again.as_deref(), Some(bytes));
    }
    if let Ok(m) = decode::<ConfigAck>(bytes) {
        let again = encode(&m).ok();
        prop_assert_eq!(again.as_deref(), Some(bytes));
    }
    Ok(())
}

fn request() -> impl Strategy<Value = EscalationRequest> {
    (
        any::<u64>(),
        any::<bool>(),
        "[a-z0-9@.-]{0,40}",
        any::<u32>(),
        prop::collection::vec(any::<u32>(), 0..4),
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..300).prop_map(TensorData::U8),
            prop::collection::vec(any::<f32>(), 0..100).prop_map(TensorData::F32),
        ],
        prop::collection::vec(any::<f32>(), 0..20),
    )
        .prop_map(
            |(id, audit, model, deadline, shape, data, probs)| EscalationRequest {
                request_id: id,
                kind: if audit {
                    EscalationKind::Audit
                } else {
                    EscalationKind::Escalation
                },
                edge_model: model,
                deadline_ms: deadline,
                input: Tensor { shape, data },
                edge_probabilities: probs,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_and_decode_canonically(
        kind in 0u8..10,
        body in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        // Half the cases get a valid header so the body decoders are exercised, not just
        // the header checks.
        let mut bytes = vec![WIRE_VERSION, kind];
        bytes.extend_from_slice(&body);
        check_all(&bytes)?;
        check_all(&body)?;
    }

    #[test]
    fn valid_requests_round_trip_and_mutations_never_panic(
        req in request(),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
        cut in any::<prop::sample::Index>(),
    ) {
        let Ok(bytes) = encode(&req) else { return Ok(()) };
        let back: EscalationRequest = decode(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        // NaN payloads compare unequal; compare the encodings instead.
        prop_assert_eq!(encode(&back).ok(), Some(bytes.clone()));
        let mut flipped = bytes.clone();
        let i = at.index(flipped.len());
        flipped[i] ^= flip;
        check_all(&flipped)?;
        check_all(&bytes[..cut.index(bytes.len() + 1)])?;
    }

    #[test]
    fn replies_round_trip(id in any::<u64>(), ok in any::<bool>(), probs in prop::collection::vec(0f32..1.0, 0..50), msg in ".{0,100}") {
        let reply = EscalationReply {
            request_id: id,
            outcome: if ok {
                ReplyOutcome::Answer { model: "m@1".into(), probabilities: probs, compute_us: 7 }
            } else {
                ReplyOutcome::Error { code: ReplyErrorCode::BadShape, message: msg }
            },
        };
        if let Ok(bytes) = encode(&reply) {
            prop_assert_eq!(decode::<EscalationReply>(&bytes).ok(), Some(reply));
        }
    }
}

const DOC: &str = r#"{"version":7,"device_id":"pi-1","issued_ms":1,"source":"tuner","settings":{"threshold":0.93,"signal":"margin","audit_rate":0.05,"escalation_timeout_ms":300,"telemetry_interval_s":10},"certificate":{"agreement_lower_bound":0.991}}"#;

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    /// The remote config document (JSON) under splice mutations: never panics, and whatever
    /// parses is within the documented ranges and survives a round trip.
    #[test]
    fn config_documents_parse_safely(
        at in any::<prop::sample::Index>(),
        len in 0usize..8,
        with in prop::collection::vec(any::<u8>(), 0..12),
    ) {
        let base = DOC.as_bytes();
        let at = at.index(base.len() + 1);
        let end = (at + len).min(base.len());
        let mut bytes = base[..at].to_vec();
        bytes.extend_from_slice(&with);
        bytes.extend_from_slice(&base[end..]);
        if let Ok(doc) = ConfigDocument::from_json(&bytes) {
            prop_assert!(doc.version >= 1);
            prop_assert!(doc.settings.validate().is_ok());
            prop_assert_eq!(ConfigDocument::from_json(&doc.to_json()).ok(), Some(doc));
        }
    }
}
