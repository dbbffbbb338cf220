//! Model rollout over the air: the relay's signed rollout document, the chunked transfer of the
//! model file, and what the agent reports back.
//!
//! | topic | direction | QoS | payload |
//! |---|---|---|---|
//! | `tierd/v1/{device}/rollout` | relay → agent, retained | 1 | signed [`RolloutDocument`] (JSON, the config envelope of [`crate::signed`]) |
//! | `tierd/v1/{device}/model/fetch` | agent → relays | 0 | [`ModelFetch`]: a range of the candidate's ONNX file |
//! | `tierd/v1/{device}/model/chunk` | relay → agent | 0 | [`ModelChunk`]: those bytes, or why not |
//! | `tierd/v1/{device}/telemetry` | agent → relays, spooled | 1 | [`RolloutAck`] and [`ShadowReport`] records |
//!
//! **Why over MQTT, in chunks.** A device already holds one authenticated connection, to the
//! broker, and the shipped ACL lets it read and write only its own topics; an HTTPS download
//! would need the relay's API reachable from the field and a second credential on every board.
//! Chunks of at most [`MAX_CHUNK_BYTES`] stay far below every broker's packet limit, and the agent
//! resumes an interrupted download (a Pi on LTE losing its link, an agent restart) from the bytes
//! it already has on disk: it asks for the range that follows them. Nothing in the chunks is
//! trusted: the manifest travels inside the signed document with its model-release signature,
//! and it pins the file by sha256, which the agent checks before it loads anything.
//!
//! A rollout brings a new version of the agent's primary model (same name: the name is the
//! Open Inference Protocol route clients call and the escalation topic).

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::telemetry::BinCounts;

/// Largest rollout document accepted, in bytes (the manifest is inlined).
pub const MAX_ROLLOUT_BYTES: usize = 64 * 1024;
/// Largest signed rollout payload: a document at its limit, escaped, plus the envelope.
pub const MAX_SIGNED_ROLLOUT_BYTES: usize = 2 * MAX_ROLLOUT_BYTES + 512;
/// Largest manifest a rollout carries.
pub const MAX_MANIFEST_BYTES: usize = 32 * 1024;
/// Largest model file a rollout may bring.
pub const MAX_MODEL_BYTES: u64 = 256 * 1024 * 1024;
/// Largest chunk a relay sends (and an agent asks for).
pub const MAX_CHUNK_BYTES: u32 = 32 * 1024;

/// What the relay asks of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutStage {
    /// Fetch and verify the candidate, then run it beside the current model on a sample of
    /// live requests and report how each agrees with the cloud.
    Shadow,
    /// Serve the candidate (switching between requests), keeping the previous model on disk.
    Promote,
    /// Drop the candidate; if it was promoted, switch back to the model it replaced.
    Rollback,
}

impl RolloutStage {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutStage::Shadow => "shadow",
            RolloutStage::Promote => "promote",
            RolloutStage::Rollback => "rollback",
        }
    }
}

/// The candidate model, as the relay ships it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    /// `name@version` of the candidate (the name is the device's primary model's).
    pub model: String,
    /// The manifest's exact text, as a model-release key signed it.
    pub manifest: String,
    /// Its detached signature (the `<manifest>.sig` file's text).
    pub signature: String,
    /// The ONNX file's size; the manifest pins its sha256.
    pub onnx_bytes: u64,
    /// The file's sha256 as the manifest states it (what the chunks are asked by).
    pub onnx_sha256: String,
}

/// Relay → agent, retained, inside the signed envelope: the rollout stage this device is in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutDocument {
    /// Names the rollout (`[A-Za-z0-9_.-]`, at most 64).
    pub rollout_id: String,
    /// Strictly increasing per device across rollouts (`max(last + 1, now in ms)`); an agent
    /// acts only on a version above the last one it handled.
    pub version: u64,
    pub device_id: String,
    /// Relay clock, Unix ms.
    pub issued_ms: u64,
    pub stage: RolloutStage,
    pub candidate: Release,
    /// Share of requests the candidate shadows, in (0, 1].
    pub shadow_rate: f64,
}

/// Why a rollout document is refused; the message says which field and why.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum RolloutDocError {
    #[error("rollout document of {0} bytes exceeds the limit of {MAX_ROLLOUT_BYTES} bytes")]
    TooLarge(usize),
    #[error("rollout document is not valid: {0}")]
    Json(String),
    #[error("rollout document: {0}")]
    Invalid(String),
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl RolloutDocument {
    pub fn from_json(bytes: &[u8]) -> Result<Self, RolloutDocError> {
        if bytes.len() > MAX_ROLLOUT_BYTES {
            return Err(RolloutDocError::TooLarge(bytes.len()));
        }
        let doc: RolloutDocument =
            serde_json::from_slice(bytes).map_err(|e| RolloutDocError::Json(e.to_string()))?;
        doc.validate()?;
        Ok(doc)
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Plain data with string keys: serializing cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Field checks; the message names the field.
    pub fn validate(&self) -> Result<(), RolloutDocError> {
        let bad = |m: String| Err(RolloutDocError::Invalid(m));
        if let Err(e) = crate::topic::validate_model_name(&self.rollout_id) {
            return bad(format!("rollout_id: {e}"));
        }
        if let Err(e) = crate::topic::validate_device_id(&self.device_id) {
            return bad(format!("device_id: {e}"));
        }
        if self.version == 0 {
            return bad("version must be at least 1".into());
        }
        if !(self.shadow_rate.is_finite() && self.shadow_rate > 0.0 && self.shadow_rate <= 1.0) {
            return bad(format!(
                "shadow_rate = {} is outside (0, 1]",
                self.shadow_rate
            ));
        }
        let c = &self.candidate;
        let Some((name, version)) = c.model.split_once('@') else {
            return bad(format!(
                "candidate.model {:?} is not name@version",
                c.model.chars().take(80).collect::<String>()
            ));
        };
        if let Err(e) = crate::topic::validate_model_name(name) {
            return bad(format!("candidate.model: {e}"));
        }
        if version.is_empty() || version.len() > 64 {
            return bad("candidate.model: the version must be 1-64 characters".into());
        }
        if c.manifest.len() > MAX_MANIFEST_BYTES {
            return bad(format!(
                "candidate.manifest is {} bytes, at most {MAX_MANIFEST_BYTES}",
                c.manifest.len()
            ));
        }
        if c.onnx_bytes == 0 || c.onnx_bytes > MAX_MODEL_BYTES {
            return bad(format!(
                "candidate.onnx_bytes = {} is outside [1, {MAX_MODEL_BYTES}]",
                c.onnx_bytes
            ));
        }
        if !is_sha256(&c.onnx_sha256) {
            return bad("candidate.onnx_sha256 is not 64 hex digits".into());
        }
        Ok(())
    }

    /// The candidate's name and version.
    pub fn candidate_name(&self) -> &str {
        self.candidate
            .model
            .split_once('@')
            .map_or(&*self.candidate.model, |(n, _)| n)
    }
}

/// Agent → relays on `tierd/v1/{device}/model/fetch`: the bytes `[offset, offset + len)` of the
/// file whose sha256 is `sha256`, for rollout `rollout_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelFetch {
    pub rollout_id: String,
    pub sha256: String,
    pub offset: u64,
    pub len: u32,
}

/// What a chunk answer carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkBody {
    Data(Vec<u8>),
    /// Why the relay cannot send it (unknown rollout or file, range past the end).
    Error(String),
}

/// Relay → agent on `tierd/v1/{device}/model/chunk`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelChunk {
    pub sha256: String,
    pub offset: u64,
    /// The file's whole size.
    pub total: u64,
    pub body: ChunkBody,
}

/// Where a device is in a rollout, as its acks say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RolloutPhase {
    /// Fetching the file: `have` of `total` bytes on disk.
    Downloading { have: u64, total: u64 },
    /// Verified (size, sha256, signature, golden vectors) and shadowing live traffic.
    Shadowing,
    /// Serving the candidate.
    Promoted,
    /// Back on (or still on) the model the candidate would have replaced.
    RolledBack,
    /// A check failed (the reason says which); the current model still serves.
    Failed,
}

/// Agent → relay through the spool: what became of rollout document `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutAck {
    pub rollout_id: String,
    pub version: u64,
    pub phase: RolloutPhase,
    /// Why it failed, or a note (empty otherwise).
    pub reason: String,
    /// `name@version` of the model serving after this step.
    pub serving: String,
}

/// Cloud-labelled shadow requests of one model, per confidence bin of that model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Labelled {
    pub requests: u64,
    pub agree: u64,
}

/// Agent → relay through the spool, with each telemetry window while shadowing: on the same
/// uniformly sampled requests, each labelled by the cloud model, how the current model and the
/// candidate agreed with it, per bin of each one's own confidence, and paired.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowReport {
    pub device_id: String,
    pub boot_id: u64,
    pub seq: u64,
    pub rollout_id: String,
    /// `name@version` of each.
    pub current: String,
    pub candidate: String,
    /// Lower bin edges (the agent's evidence bins).
    pub edges: Vec<f32>,
    pub current_bins: Vec<Labelled>,
    pub candidate_bins: Vec<Labelled>,
    /// Pairs where only the current model agreed with the cloud, and only the candidate did.
    pub current_only: u64,
    pub candidate_only: u64,
}

impl ShadowReport {
    /// The labelled pairs counted.
    pub fn pairs(&self) -> u64 {
        self.current_bins
            .iter()
            .fold(0u64, |a, b| a.saturating_add(b.requests))
    }
}

impl Labelled {
    /// As the tuner's evidence: every request labelled, as if escalated.
    pub fn as_bin(self) -> BinCounts {
        BinCounts {
            escalated: self.requests,
            escalated_labelled: self.requests,
            escalated_agree: self.agree,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> RolloutDocument {
        RolloutDocument {
            rollout_id: "digits-2".into(),
            version: 3,
            device_id: "pi-1".into(),
            issued_ms: 1,
            stage: RolloutStage::Shadow,
            candidate: Release {
                model: "digits-edge@2.0.0".into(),
                manifest: "name = \"digits-edge\"\n".into(),
                signature: "{}".into(),
                onnx_bytes: 22439,
                onnx_sha256: "ab".repeat(32),
            },
            shadow_rate: 0.2,
        }
    }

    #[test]
    fn round_trips_and_refuses_with_the_field() {
        let d = doc();
        assert_eq!(RolloutDocument::from_json(&d.to_json()), Ok(d.clone()));
        assert_eq!(d.candidate_name(), "digits-edge");
        let text = String::from_utf8(d.to_json()).expect("utf8");
        for (bad, needle) in [
            (text.replace("\"shadow\"", "\"canary\""), "unknown variant"),
            (text.replace("0.2", "0"), "shadow_rate = 0"),
            (text.replace("0.2", "1.5"), "shadow_rate = 1.5"),
            (
                text.replace("digits-edge@2.0.0", "digits-edge"),
                "name@version",
            ),
            (
                text.replace("digits-edge@2.0.0", "a/b@1"),
                "candidate.model",
            ),
            (text.replace("\"digits-2\"", "\"+\""), "rollout_id"),
            (text.replace("22439", "0"), "onnx_bytes = 0"),
            (text.replace(&"ab".repeat(32), "zz"), "onnx_sha256"),
            (text.replace("\"version\":3", "\"version\":0"), "version"),
            (text.replace("\"stage\"", "\"stag\""), "unknown field"),
        ] {
            let e = RolloutDocument::from_json(bad.as_bytes())
                .expect_err(needle)
                .to_string();
            assert!(e.contains(needle), "{needle:?} not in {e:?}");
        }
        let big = vec![b' '; MAX_ROLLOUT_BYTES + 1];
        assert!(matches!(
            RolloutDocument::from_json(&big),
            Err(RolloutDocError::TooLarge(_))
        ));
        let mut huge = d;
        huge.candidate.manifest = "x".repeat(MAX_MANIFEST_BYTES + 1);
        assert!(huge.validate().is_err());
    }
}
