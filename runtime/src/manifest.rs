//! Model manifests: the TOML file beside each `.onnx` that says what the model is, how to feed
//! it, and what it must answer for a few golden inputs.
//!
//! Parsing is strict (`deny_unknown_fields`): a typo in a manifest is an error, not a default.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::model::ModelError;

/// Element types a manifest may name (Open Inference Protocol spelling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Dtype {
    #[serde(rename = "UINT8")]
    Uint8,
    #[serde(rename = "FP32")]
    Fp32,
}

impl Dtype {
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Uint8 => "UINT8",
            Dtype::Fp32 => "FP32",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Name of the ONNX graph input.
    pub name: String,
    /// Shape of one request's input, batch dimension included (e.g. `[1, 64]`).
    pub shape: Vec<usize>,
    /// Element type of the ONNX graph input.
    pub dtype: Dtype,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// Element type clients send (raw sensor values).
    pub wire_dtype: Dtype,
    /// `model_input = wire_value * scale + offset`.
    pub scale: f32,
    pub offset: f32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// Name of the ONNX graph output holding class probabilities.
    pub name: String,
    pub labels: Vec<String>,
}

/// An input with the probabilities the model must produce for it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Golden {
    pub pixels: Vec<u8>,
    pub probabilities: Vec<f32>,
    /// Largest absolute difference allowed per probability.
    pub tolerance: f32,
}

/// A threshold certified offline on a held-out calibration set, every request of which has
/// the reference (cloud) model's answer: answering locally at or above `threshold` disagrees
/// with the reference on `disagreements` of `samples` requests, and the exact one-sided
/// Clopper–Pearson bound at `delta` puts agreement at or above `agreement_lower_bound`, which
/// meets `target`. The threshold is the lowest of the agent's bin edges that passes when they
/// are tested from the top down (fixed-sequence testing, so no multiplicity correction).
///
/// A device starts at this threshold (unless `agent.toml` sets one); the relay re-derives the
/// bound from `samples` and `disagreements` before it believes it.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// The confidence signal thresholded (`max_prob`).
    pub signal: String,
    pub threshold: f32,
    pub target: f64,
    pub delta: f64,
    pub samples: u64,
    pub disagreements: u64,
    pub agreement_lower_bound: f64,
    /// Share of the calibration set escalated at `threshold`.
    pub escalation_rate: f64,
    /// `name@version` of the model agreement is measured against.
    pub reference: String,
    /// What the calibration set is.
    #[serde(default)]
    pub set: String,
}

impl Calibration {
    fn check(&self) -> Result<(), ManifestInvalid> {
        let unit = |v: f64| v.is_finite() && (0.0..=1.0).contains(&v);
        if self.signal != "max_prob" {
            return Err(ManifestInvalid::from(format!(
                "calibration.signal {:?}: only \"max_prob\" is supported",
                self.signal
            )));
        }
        if !(self.threshold.is_finite() && (0.0..=1.01).contains(&self.threshold)) {
            return Err(ManifestInvalid::from(format!(
                "calibration.threshold {} must be within [0, 1.01]",
                self.threshold
            )));
        }
        let open_unit = |v: f64| unit(v) && v > 0.0 && v < 1.0;
        if !(open_unit(self.target) && open_unit(self.delta)) {
            return Err(ManifestInvalid::from(
                "calibration.target and calibration.delta must be within (0, 1)",
            ));
        }
        if self.samples == 0 || self.disagreements > self.samples {
            return Err(ManifestInvalid::from(format!(
                "calibration: {} disagreements in {} samples",
                self.disagreements, self.samples
            )));
        }
        if !unit(self.agreement_lower_bound) || !unit(self.escalation_rate) {
            return Err(ManifestInvalid::from(
                "calibration.agreement_lower_bound and escalation_rate must be within [0, 1]",
            ));
        }
        // A lower bound above the observed agreement, or below the target it claims to meet,
        // is not a certificate (the relay re-derives the exact bound).
        let observed = 1.0 - self.disagreements as f64 / self.samples as f64;
        if self.agreement_lower_bound > observed + 1e-9 || self.agreement_lower_bound < self.target
        {
            return Err(ManifestInvalid::from(format!(
                "calibration: lower bound {} must lie between the target {} and the observed \
                 agreement {observed:.6}",
                self.agreement_lower_bound, self.target
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub description: String,
    /// Path of the ONNX file, relative to the manifest.
    pub file: PathBuf,
    /// Hex sha256 of the ONNX file.
    pub sha256: String,
    pub input: InputSpec,
    pub preprocess: Preprocess,
    pub output: OutputSpec,
    #[serde(default)]
    pub golden: Vec<Golden>,
    /// The threshold certified offline for this model, if it ships one.
    #[serde(default)]
    pub calibration: Option<Calibration>,
    /// Directory of the manifest, for resolving `file`.
    #[serde(skip)]
    pub dir: PathBuf,
}

impl Manifest {
    /// Reads and checks a manifest (the model file itself is checked by [`crate::Model::load`]).
    pub fn from_path(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
            path: path.to_owned(),
            source: e,
        })?;
        Self::from_text(path, &text)
    }

    /// Parses and checks the text of the manifest at `path` (for resolving `file`).
    pub fn from_text(path: &Path, text: &str) -> Result<Self, ModelError> {
        let mut m = Self::parse(text).map_err(|reason| ModelError::Manifest {
            path: path.to_owned(),
            reason: reason.0,
        })?;
        m.dir = path.parent().map(Path::to_owned).unwrap_or_default();
        Ok(m)
    }

    /// Parses and checks manifest text; the error is a human-readable reason.
    pub fn parse(text: &str) -> Result<Self, ManifestInvalid> {
        let m: Manifest = toml::from_str(text).map_err(|e| ManifestInvalid(e.to_string()))?;
        m.check()?;
        Ok(m)
    }

    fn check(&self) -> Result<(), ManifestInvalid> {
        if self.name.is_empty()
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(ManifestInvalid::from(format!(
                "name {:?} must be non-empty and use only letters, digits, '-', '_', '.'",
                self.name
            )));
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ManifestInvalid::from(format!(
                "sha256 {:?} is not 64 hex digits",
                self.sha256
            )));
        }
        if self.input.shape.is_empty() || self.input.shape.contains(&0) {
            return Err(ManifestInvalid::from(format!(
                "input.shape {:?} must be non-empty with positive dimensions",
                self.input.shape
            )));
        }
        if self.input.shape[0] != 1 {
            return Err(ManifestInvalid::from(format!(
                "input.shape {:?}: the first (batch) dimension must be 1",
                self.input.shape
            )));
        }
        if self.input.dtype != Dtype::Fp32 {
            return Err(ManifestInvalid::from(
                "input.dtype: only FP32 model inputs are supported",
            ));
        }
        if !self.preprocess.scale.is_finite() || !self.preprocess.offset.is_finite() {
            return Err(ManifestInvalid::from(
                "preprocess.scale and preprocess.offset must be finite",
            ));
        }
        if self.output.labels.len() < 2 {
            return Err(ManifestInvalid::from(
                "output.labels needs at least two classes",
            ));
        }
        if let Some(c) = &self.calibration {
            c.check()?;
        }
        let n_in = self.input_elements();
        for (i, g) in self.golden.iter().enumerate() {
            if g.pixels.len() != n_in {
                return Err(ManifestInvalid::from(format!(
                    "golden[{i}] has {} pixels, the input holds {n_in}",
                    g.pixels.len()
                )));
            }
            if g.probabilities.len() != self.output.labels.len() {
                return Err(ManifestInvalid::from(format!(
                    "golden[{i}] has {} probabilities for {} labels",
                    g.probabilities.len(),
                    self.output.labels.len()
                )));
            }
            if !(g.tolerance.is_finite() && g.tolerance > 0.0 && g.tolerance < 0.5) {
                return Err(ManifestInvalid::from(format!(
                    "golden[{i}].tolerance must be in (0, 0.5)"
                )));
            }
        }
        Ok(())
    }

    /// Number of elements in one request's input.
    pub fn input_elements(&self) -> usize {
        self.input.shape.iter().product()
    }

    /// `name@version`, the identity used on the wire and in logs.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    /// A tensor of raw wire values shaped like this model's input, in the manifest's wire dtype.
    pub fn wire_input(&self, values: Vec<u8>) -> tierd_protocol::Tensor {
        let data = match self.preprocess.wire_dtype {
            Dtype::Uint8 => tierd_protocol::TensorData::U8(values),
            // An FP32-wire model takes raw values as floats; preprocessing is then skipped, so
            // apply it here to keep golden vectors meaning the same thing for both wire types.
            Dtype::Fp32 => tierd_protocol::TensorData::F32(
                values
                    .into_iter()
                    .map(|v| f32::from(v) * self.preprocess.scale + self.preprocess.offset)
                    .collect(),
            ),
        };
        tierd_protocol::Tensor {
            shape: self.input.shape.iter().map(|&d| d as u32).collect(),
            data,
        }
    }

    pub fn model_path(&self) -> PathBuf {
        self.dir.join(&self.file)
    }
}

tierd_protocol::reason_error!(
    /// Why a manifest's text is refused: a human-readable reason.
    ManifestInvalid
);

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "m"
version = "1"
file = "m.onnx"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
[input]
name = "input"
shape = [1, 2]
dtype = "FP32"
[preprocess]
wire_dtype = "UINT8"
scale = 0.5
offset = 0.0
[output]
name = "probabilities"
labels = ["a", "b"]
[[golden]]
pixels = [1, 2]
probabilities = [0.5, 0.5]
tolerance = 0.001
"#;

    #[test]
    fn parses_a_good_manifest() {
        let m = Manifest::parse(GOOD).unwrap();
        assert_eq!(m.id(), "m@1");
        assert_eq!(m.input_elements(), 2);
    }

    #[test]
    fn rejects_bad_manifests_with_a_reason() {
        let cases = [
            (
                GOOD.replace("name = \"m\"", "name = \"m\"\ncolour = 1"),
                "unknown field",
            ),
            (GOOD.replace("0000000000", "zz"), "sha256"),
            (GOOD.replace("shape = [1, 2]", "shape = [2, 2]"), "batch"),
            (GOOD.replace("pixels = [1, 2]", "pixels = [1]"), "golden[0]"),
            (
                GOOD.replace("labels = [\"a\", \"b\"]", "labels = [\"a\"]"),
                "labels",
            ),
            (GOOD.replace("\"FP32\"", "\"FP64\""), "unknown variant"),
        ];
        for (text, needle) in cases {
            let err = Manifest::parse(&text).unwrap_err();
            assert!(err.0.contains(needle), "{needle:?} not in {err:?}");
        }
    }
}
