//! Model manifests: the TOML file beside each `.onnx` that says what the model is, how to feed
//! it, and what it must answer for a few golden inputs.
//!
//! Parsing is strict (`deny_unknown_fields`): a typo in a manifest is an error, not a default.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::model::{InputError, ModelError};
use tierd_protocol::{Tensor, TensorData};

/// Element types a manifest may name (Open Inference Protocol spelling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
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

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Name of the ONNX graph input.
    pub name: String,
    /// Shape of one request's input, batch dimension included (e.g. `[1, 64]`).
    pub shape: Vec<usize>,
    /// Element type of the ONNX graph input.
    pub dtype: Dtype,
}

/// How 8-bit wire input becomes the model's FP32 input. Only for `wire_dtype = "UINT8"`: a
/// model without `[preprocess]` takes FP32 on the wire, fed to the graph as it is.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// Element type clients send (raw sensor values): `UINT8`.
    pub wire_dtype: Dtype,
    /// `model_input = wire_value * scale + offset`.
    pub scale: f32,
    pub offset: f32,
}

/// What the graph's output holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    /// Class probabilities (a softmax or `predict_proba` output): used as they are.
    Probabilities,
    /// Unnormalized scores: softmaxed before confidence and before they are answered.
    Logits,
}

impl OutputKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputKind::Probabilities => "probabilities",
            OutputKind::Logits => "logits",
        }
    }
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// Name of the ONNX graph output holding one value per class.
    pub name: String,
    /// `"probabilities"` or `"logits"`; required, so a logits model is never taken for
    /// probabilities (it would never escalate).
    pub kind: OutputKind,
    pub labels: Vec<String>,
}

/// An input (in wire values) with the raw outputs the graph must produce for it.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Golden {
    /// Wire values: integers 0..=255 for `UINT8` wire input, else the model's FP32 input.
    #[serde(alias = "pixels")]
    pub input: Vec<f32>,
    /// The graph's output (probabilities or logits, per `output.kind`).
    #[serde(alias = "probabilities")]
    pub outputs: Vec<f32>,
    /// Largest absolute difference allowed per output.
    pub tolerance: f32,
}

/// Largest distance from 1 of the sum of a probabilities output (float rounding of a softmax in
/// FP32 or a dequantized int8 output stays far below it; logits almost never land within it).
pub const PROBABILITY_SUM_SLACK: f32 = 2e-3;

/// Why `outputs` cannot be class probabilities, if they cannot.
pub fn not_probabilities(outputs: &[f32]) -> Option<String> {
    let sum: f32 = outputs.iter().sum();
    if let Some(v) = outputs.iter().find(|v| !(-1e-4..=1.0 + 1e-4).contains(*v)) {
        return Some(format!("holds {v}, outside [0, 1]"));
    }
    if (sum - 1.0).abs() > PROBABILITY_SUM_SLACK {
        return Some(format!("sums to {sum}, not 1"));
    }
    None
}

/// The numerically stable softmax of `logits`.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
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

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
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
    /// Only for 8-bit wire input; absent: clients send the model's FP32 input as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocess: Option<Preprocess>,
    pub output: OutputSpec,
    /// The threshold certified offline for this model, if it ships one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Calibration>,
    /// At least one: the load refuses a model that does not reproduce them.
    #[serde(default)]
    pub golden: Vec<Golden>,
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
        if let Some(p) = &self.preprocess {
            if p.wire_dtype != Dtype::Uint8 {
                return Err(ManifestInvalid::from(
                    "preprocess.wire_dtype: [preprocess] is for UINT8 wire input only; FP32 \
                     input goes to the model as it is, so drop [preprocess]",
                ));
            }
            if !(p.scale.is_finite() && p.scale != 0.0 && p.offset.is_finite()) {
                return Err(ManifestInvalid::from(
                    "preprocess.scale must be finite and non-zero, preprocess.offset finite",
                ));
            }
        }
        if self.output.labels.len() < 2 {
            return Err(ManifestInvalid::from(
                "output.labels needs at least two classes",
            ));
        }
        if let Some(c) = &self.calibration {
            c.check()?;
        }
        if self.golden.is_empty() {
            return Err(ManifestInvalid::from(
                "no [[golden]] vectors: at least one is required, so a model that computes wrong \
                 results in this runtime is refused (`edge-agent model init` writes them)",
            ));
        }
        let n_in = self.input_elements();
        let uint8 = self.wire_dtype() == Dtype::Uint8;
        for (i, g) in self.golden.iter().enumerate() {
            if g.input.len() != n_in {
                return Err(ManifestInvalid::from(format!(
                    "golden[{i}] has {} input values, the input holds {n_in}",
                    g.input.len()
                )));
            }
            if let Some(v) = g.input.iter().find(|v| !v.is_finite()) {
                return Err(ManifestInvalid::from(format!(
                    "golden[{i}].input holds {v}"
                )));
            }
            if uint8 {
                if let Some(v) = g
                    .input
                    .iter()
                    .find(|v| v.fract() != 0.0 || !(0.0..=255.0).contains(*v))
                {
                    return Err(ManifestInvalid::from(format!(
                        "golden[{i}].input holds {v}, not a UINT8 wire value (0..=255)"
                    )));
                }
            }
            if g.outputs.len() != self.output.labels.len() {
                return Err(ManifestInvalid::from(format!(
                    "golden[{i}] has {} outputs for {} labels",
                    g.outputs.len(),
                    self.output.labels.len()
                )));
            }
            if !(g.tolerance.is_finite() && g.tolerance > 0.0 && g.tolerance < 0.5) {
                return Err(ManifestInvalid::from(format!(
                    "golden[{i}].tolerance must be in (0, 0.5)"
                )));
            }
            if self.output.kind == OutputKind::Probabilities {
                if let Some(why) = not_probabilities(&g.outputs) {
                    return Err(ManifestInvalid::from(format!(
                        "output.kind = \"probabilities\" but golden[{i}].outputs {why}; if the \
                         model outputs unnormalized scores, set output.kind = \"logits\""
                    )));
                }
            }
        }
        Ok(())
    }

    /// Element type clients send: `UINT8` with `[preprocess]`, else `FP32`.
    pub fn wire_dtype(&self) -> Dtype {
        self.preprocess
            .as_ref()
            .map(|p| p.wire_dtype)
            .unwrap_or(Dtype::Fp32)
    }

    /// Number of elements in one request's input.
    pub fn input_elements(&self) -> usize {
        self.input.shape.iter().product()
    }

    /// `name@version`, the identity used on the wire and in logs.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    /// A tensor of wire values shaped like this model's input, in the manifest's wire dtype
    /// (values of a `UINT8` wire are checked integers 0..=255, see [`Manifest::parse`]).
    pub fn wire_input(&self, values: &[f32]) -> tierd_protocol::Tensor {
        let data = match self.wire_dtype() {
            Dtype::Uint8 => tierd_protocol::TensorData::U8(
                values.iter().map(|&v| v.clamp(0.0, 255.0) as u8).collect(),
            ),
            Dtype::Fp32 => tierd_protocol::TensorData::F32(values.to_vec()),
        };
        tierd_protocol::Tensor {
            shape: self.input.shape.iter().map(|&d| d as u32).collect(),
            data,
        }
    }

    /// Checks dtype and shape. Accepted shapes: the manifest's (`[1, 64]`) or the same without the
    /// batch dimension (`[64]`). A `UINT8`-wire model also takes FP32 already in its input space.
    pub fn check_input(&self, input: &Tensor) -> Result<(), InputError> {
        input.validate()?;
        let wire = self.wire_dtype().as_str();
        let dtype = input.data.dtype_name();
        if dtype != wire && dtype != "FP32" {
            return Err(InputError::Dtype { got: dtype, wire });
        }
        let expected = &self.input.shape;
        let unbatched = &expected[1..];
        let got: Vec<usize> = input.shape.iter().map(|&d| d as usize).collect();
        if got == *expected || got == unbatched {
            return Ok(());
        }
        if got.len() == expected.len() && got[1..] == *unbatched && got[0] > 1 {
            return Err(InputError::Batch(input.shape[0]));
        }
        Err(InputError::Shape {
            got: input.shape.clone(),
            expected: expected.clone(),
            unbatched: unbatched.to_vec(),
        })
    }

    /// The graph's FP32 input for a checked wire tensor: 8-bit values scaled per
    /// `[preprocess]`, FP32 values as they are.
    pub fn model_input(&self, input: &Tensor) -> Result<Vec<f32>, InputError> {
        self.check_input(input)?;
        Ok(match (&input.data, &self.preprocess) {
            (TensorData::U8(v), Some(p)) => v
                .iter()
                .map(|&x| f32::from(x) * p.scale + p.offset)
                .collect(),
            // check_input lets U8 through only for a UINT8 wire, which has [preprocess].
            (TensorData::U8(v), None) => v.iter().map(|&x| f32::from(x)).collect(),
            (TensorData::F32(v), _) => v.clone(),
        })
    }

    /// Class probabilities from the graph's raw output (a logits output softmaxed).
    pub fn probabilities(&self, outputs: Vec<f32>) -> Vec<f32> {
        match self.output.kind {
            OutputKind::Probabilities => outputs,
            OutputKind::Logits => softmax(&outputs),
        }
    }

    /// The manifest as TOML (what `edge-agent model init` writes).
    pub fn to_toml(&self) -> Result<String, ManifestInvalid> {
        toml::to_string(self).map_err(|e| ManifestInvalid(e.to_string()))
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
kind = "probabilities"
labels = ["a", "b"]
[[golden]]
input = [1, 2]
outputs = [0.5, 0.5]
tolerance = 0.001
"#;

    #[test]
    fn parses_a_good_manifest() {
        let m = Manifest::parse(GOOD).unwrap();
        assert_eq!(m.id(), "m@1");
        assert_eq!(m.input_elements(), 2);
        assert_eq!(m.wire_dtype(), Dtype::Uint8);
        // What `model init` writes parses back to the same manifest.
        let again = Manifest::parse(&m.to_toml().unwrap()).unwrap();
        assert_eq!(again.to_toml().unwrap(), m.to_toml().unwrap());
    }

    #[test]
    fn old_golden_keys_still_parse_and_logits_need_not_sum_to_one() {
        let old = GOOD
            .replace("input = [1, 2]", "pixels = [1, 2]")
            .replace("outputs = [0.5, 0.5]", "probabilities = [0.5, 0.5]");
        assert_eq!(Manifest::parse(&old).unwrap().golden[0].input, [1.0, 2.0]);
        let logits = GOOD
            .replace("kind = \"probabilities\"", "kind = \"logits\"")
            .replace("outputs = [0.5, 0.5]", "outputs = [-3.5, 1.7]");
        Manifest::parse(&logits).unwrap();
        // FP32 wire: no [preprocess], golden inputs any finite floats.
        let fp32 = GOOD
            .replace(
                "[preprocess]\nwire_dtype = \"UINT8\"\nscale = 0.5\noffset = 0.0\n",
                "",
            )
            .replace("input = [1, 2]", "input = [-0.25, 7.5]");
        let m = Manifest::parse(&fp32).unwrap();
        assert_eq!(m.wire_dtype(), Dtype::Fp32);
    }

    #[test]
    fn softmax_is_stable_and_sums_to_one() {
        let p = softmax(&[-3.59, 1.68, 1.91]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((p[2] - 0.5556).abs() < 1e-3, "{p:?}");
        let big = softmax(&[1000.0, 0.0]);
        assert!(big[0].is_finite() && (big[0] - 1.0).abs() < 1e-6);
        assert!(not_probabilities(&[-3.59, 1.68, 1.91]).is_some());
        assert!(not_probabilities(&p).is_none());
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
            (GOOD.replace("input = [1, 2]", "input = [1]"), "golden[0]"),
            (
                GOOD.replace("input = [1, 2]", "input = [1, 2.5]"),
                "not a UINT8 wire value",
            ),
            (
                GOOD.replace("outputs = [0.5, 0.5]", "outputs = [-3.5, 1.7]"),
                "set output.kind = \"logits\"",
            ),
            (
                GOOD.replace("kind = \"probabilities\"\n", ""),
                "missing field `kind`",
            ),
            (
                GOOD.replace("wire_dtype = \"UINT8\"", "wire_dtype = \"FP32\""),
                "UINT8 wire input only",
            ),
            (
                GOOD[..GOOD.find("[[golden]]").unwrap()].to_string(),
                "at least one is required",
            ),
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
