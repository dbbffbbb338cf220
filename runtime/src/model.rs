//! A verified, optimized tract plan and the checks that guard its input.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use thiserror::Error;
use tierd_protocol::{Tensor, TensorData, TensorError};
use tract_onnx::prelude::*;

use crate::manifest::Manifest;

/// Why a model could not be loaded.
#[derive(Debug, Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid manifest {path}: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error("{path}: sha256 is {actual} but the manifest says {expected}; the file is corrupt or was replaced")]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{path}: tract cannot load this model: {reason}")]
    Compile { path: PathBuf, reason: String },
    #[error("{path}: refused: model keys are trusted ([model] trusted_keys) but {reason}")]
    Signature { path: PathBuf, reason: String },
    #[error("{model}: golden vector {index} differs at class {class}: expected {expected:.6}, got {actual:.6} (|diff| {diff:.2e} > tolerance {tolerance:.1e}); the model computes wrong results in this runtime")]
    GoldenMismatch {
        model: String,
        index: usize,
        class: usize,
        expected: f32,
        actual: f32,
        diff: f32,
        tolerance: f32,
    },
    #[error("{model}: golden vector {index} failed to run: {reason}")]
    GoldenRun {
        model: String,
        index: usize,
        reason: String,
    },
}

/// Why an input cannot be fed to a model. Messages are meant for the client that sent it.
#[derive(Debug, Error, PartialEq)]
pub enum InputError {
    #[error(transparent)]
    Tensor(#[from] TensorError),
    #[error("datatype {got} is not accepted; send {}", accepted(wire))]
    Dtype {
        got: &'static str,
        wire: &'static str,
    },
    #[error("shape {got:?} does not match the model input {expected:?} (or {unbatched:?})")]
    Shape {
        got: Vec<u32>,
        expected: Vec<usize>,
        unbatched: Vec<usize>,
    },
    #[error("batch size {0} is not supported: send one input per request")]
    Batch(u32),
    #[error("model failed to run: {0}")]
    Runtime(String),
}

fn accepted(wire: &str) -> String {
    if wire == "FP32" {
        "FP32".into()
    } else {
        format!("{wire} (raw values) or FP32 (preprocessed)")
    }
}

/// A model's answer for one input.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub probabilities: Vec<f32>,
    /// Wall time of the forward pass alone.
    pub compute: Duration,
}

/// A loaded, verified model. Cheap to share: the plan is behind an `Arc` and runs concurrently.
#[derive(Clone)]
pub struct Model {
    manifest: Arc<Manifest>,
    plan: Arc<TypedRunnableModel>,
    file_bytes: u64,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("id", &self.manifest.id())
            .finish()
    }
}

/// Where a manifest's detached signature lives: the manifest's path with `.sig` appended.
pub fn signature_path(manifest: &Path) -> PathBuf {
    let mut p = manifest.as_os_str().to_owned();
    p.push(".sig");
    PathBuf::from(p)
}

impl Model {
    /// Loads the manifest at `path`, then the model it names; see [`Model::from_manifest`].
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        Self::from_manifest(Manifest::from_path(path)?)
    }

    /// [`Model::load`], but when `trusted` is not empty the manifest must carry a signature
    /// (`<manifest>.sig`, see [`tierd_protocol::signed::verify_manifest`]) by one of these
    /// model-release keys; the manifest is parsed from the very bytes that were verified, and
    /// its sha256 then pins the ONNX file.
    pub fn load_trusted(
        path: &Path,
        trusted: &[tierd_protocol::PublicKey],
    ) -> Result<Self, ModelError> {
        if trusted.is_empty() {
            return Self::load(path);
        }
        let io = |p: &Path| {
            let p = p.to_owned();
            move |source| ModelError::Io { path: p, source }
        };
        let bytes = std::fs::read(path).map_err(io(path))?;
        let sig_path = signature_path(path);
        let refuse = |reason: String| ModelError::Signature {
            path: path.to_owned(),
            reason,
        };
        let sig = match std::fs::read(&sig_path) {
            Ok(sig) => sig,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(refuse(format!(
                    "it is unsigned (no {}); sign it with `edge-agent model sign`",
                    sig_path.display()
                )))
            }
            Err(e) => return Err(io(&sig_path)(e)),
        };
        let key = tierd_protocol::signed::verify_manifest(&sig, &bytes, trusted)
            .map_err(|e| refuse(e.to_string()))?;
        tracing::info!(manifest = %path.display(), key_id = %key.key_id(), "model manifest signature verified");
        let text = String::from_utf8(bytes).map_err(|_| ModelError::Manifest {
            path: path.to_owned(),
            reason: "not UTF-8".into(),
        })?;
        Self::from_manifest(Manifest::from_text(path, &text)?)
    }

    /// Verifies the file's sha256, compiles it, and checks every golden vector.
    pub fn from_manifest(manifest: Manifest) -> Result<Self, ModelError> {
        let path = manifest.model_path();
        let bytes = std::fs::read(&path).map_err(|e| ModelError::Io {
            path: path.clone(),
            source: e,
        })?;
        let actual = hex::encode(Sha256::digest(&bytes));
        if !actual.eq_ignore_ascii_case(&manifest.sha256) {
            return Err(ModelError::Checksum {
                path,
                expected: manifest.sha256.clone(),
                actual,
            });
        }
        let plan = compile(&bytes, &manifest).map_err(|e| ModelError::Compile {
            path: path.clone(),
            reason: format!("{e:#}"),
        })?;
        let model = Model {
            manifest: Arc::new(manifest),
            plan,
            file_bytes: bytes.len() as u64,
        };
        model.verify_golden()?;
        Ok(model)
    }

    /// Runs every golden vector through the compiled model; the watchdog self-check uses it too.
    pub fn verify_golden(&self) -> Result<(), ModelError> {
        let m = &self.manifest;
        for (index, g) in m.golden.iter().enumerate() {
            let input = m.wire_input(g.pixels.clone());
            let got = self
                .predict(&input)
                .map_err(|e| ModelError::GoldenRun {
                    model: m.id(),
                    index,
                    reason: e.to_string(),
                })?
                .probabilities;
            for (class, (&expected, &actual)) in g.probabilities.iter().zip(&got).enumerate() {
                let diff = (expected - actual).abs();
                // NaN compares false to everything, so test "within tolerance" and negate.
                if diff.is_nan() || diff > g.tolerance {
                    return Err(ModelError::GoldenMismatch {
                        model: m.id(),
                        index,
                        class,
                        expected,
                        actual,
                        diff,
                        tolerance: g.tolerance,
                    });
                }
            }
        }
        Ok(())
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// `name@version`.
    pub fn id(&self) -> String {
        self.manifest.id()
    }

    /// Size of the ONNX file in bytes.
    pub fn file_bytes(&self) -> u64 {
        self.file_bytes
    }

    pub fn labels(&self) -> &[String] {
        &self.manifest.output.labels
    }

    /// Checks dtype and shape. Accepted shapes: the manifest's (`[1, 64]`) or the same without the
    /// batch dimension (`[64]`).
    pub fn check_input(&self, input: &Tensor) -> Result<(), InputError> {
        input.validate()?;
        let m = &self.manifest;
        let wire = m.preprocess.wire_dtype.as_str();
        let dtype = input.data.dtype_name();
        if dtype != wire && dtype != "FP32" {
            return Err(InputError::Dtype { got: dtype, wire });
        }
        let expected = &m.input.shape;
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

    /// Runs the model on one input. Raw values are preprocessed per the manifest; FP32 values are
    /// taken as already in the model's input space.
    pub fn predict(&self, input: &Tensor) -> Result<Prediction, InputError> {
        self.check_input(input)?;
        let p = &self.manifest.preprocess;
        let values: Vec<f32> = match &input.data {
            TensorData::U8(v) => v
                .iter()
                .map(|&x| f32::from(x) * p.scale + p.offset)
                .collect(),
            TensorData::F32(v) => v.clone(),
        };
        let started = Instant::now();
        let probabilities = self
            .run(values)
            .map_err(|e| InputError::Runtime(format!("{e:#}")))?;
        let compute = started.elapsed();
        if probabilities.len() != self.labels().len() {
            return Err(InputError::Runtime(format!(
                "model returned {} values for {} labels",
                probabilities.len(),
                self.labels().len()
            )));
        }
        if let Some(i) = probabilities.iter().position(|x| !x.is_finite()) {
            return Err(InputError::Runtime(format!(
                "model returned a non-finite probability for class {i}"
            )));
        }
        Ok(Prediction {
            probabilities,
            compute,
        })
    }

    fn run(&self, values: Vec<f32>) -> TractResult<Vec<f32>> {
        let x = tract_ndarray::Array::from_shape_vec(self.manifest.input.shape.clone(), values)?;
        let out = self.plan.run(tvec!(x.into_tensor().into()))?;
        let probs = out
            .first()
            .ok_or_else(|| anyhow::anyhow!("model produced no output"))?
            .to_plain_array_view::<f32>()?;
        Ok(probs.iter().copied().collect())
    }

    /// Mean and p99 forward time over `n` runs of the first golden input (or zeros).
    pub fn time_forward(&self, n: usize) -> Result<(Duration, Duration), InputError> {
        let m = &self.manifest;
        let pixels = m
            .golden
            .first()
            .map(|g| g.pixels.clone())
            .unwrap_or_else(|| vec![0; m.input_elements()]);
        let input = m.wire_input(pixels);
        let mut times = Vec::with_capacity(n.max(1));
        for _ in 0..n.max(1) {
            times.push(self.predict(&input)?.compute);
        }
        times.sort();
        let mean = times.iter().sum::<Duration>() / times.len() as u32;
        let p99 = times[(times.len() * 99 / 100).min(times.len() - 1)];
        Ok((mean, p99))
    }
}

fn compile(bytes: &[u8], m: &Manifest) -> TractResult<Arc<TypedRunnableModel>> {
    // Models passed through onnxruntime's quant_pre_process carry symbolic value_info that tract
    // would otherwise trust over the concrete input fact we set below.
    let mut model = tract_onnx::onnx()
        .with_ignore_value_info(true)
        .model_for_read(&mut std::io::Cursor::new(bytes))?;
    let input_ix = model
        .input_outlets()?
        .iter()
        .position(|o| {
            model.outlet_label(*o) == Some(m.input.name.as_str())
                || model.node(o.node).name == m.input.name
        })
        .ok_or_else(|| anyhow::anyhow!("the graph has no input named {:?}", m.input.name))?;
    if input_ix != 0 || model.input_outlets()?.len() != 1 {
        anyhow::bail!("the graph must have exactly one input, {:?}", m.input.name);
    }
    model = model.with_input_fact(0, f32::fact(&m.input.shape).into())?;
    let output = model
        .find_outlet_label(&m.output.name)
        .or_else(|| {
            model
                .node_by_name(&m.output.name)
                .ok()
                .map(|n| OutletId::new(n.id, 0))
        })
        .ok_or_else(|| anyhow::anyhow!("the graph has no output named {:?}", m.output.name))?;
    // Only the probabilities are needed; dropping other outputs (e.g. skl2onnx's `label`, which
    // tract types as TDim) lets the optimizer prune their branch.
    model.select_output_outlets(&[output])?;
    model.into_optimized()?.into_runnable()
}
