//! A verified, optimized tract plan and the checks that guard its input.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use thiserror::Error;
use tierd_protocol::{Tensor, TensorError};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;
use tract_onnx::tract_hir::internal::DimLike;

use crate::manifest::{Manifest, OutputKind};

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
    #[error("{model}: output.kind = \"probabilities\" but the model's output for golden vector {index} {why}; if the model outputs unnormalized scores, set output.kind = \"logits\" in the manifest")]
    NotProbabilities {
        model: String,
        index: usize,
        why: String,
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

fn accepted(wire: &'static str) -> String {
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
        let model = Self::compile_unverified(manifest)?;
        model.verify_golden()?;
        Ok(model)
    }

    /// [`Model::from_manifest`] without the golden vectors: for `edge-agent model init`, which
    /// computes them. Never serve a model loaded this way.
    pub fn compile_unverified(manifest: Manifest) -> Result<Self, ModelError> {
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
            reason: with_hint(format!("{e:#}")),
        })?;
        Ok(Model {
            manifest: Arc::new(manifest),
            plan,
            file_bytes: bytes.len() as u64,
        })
    }

    /// Runs every golden vector through the compiled model; the watchdog self-check uses it too.
    /// Compares the graph's raw output (probabilities or logits, per `output.kind`).
    pub fn verify_golden(&self) -> Result<(), ModelError> {
        let m = &self.manifest;
        for (index, g) in m.golden.iter().enumerate() {
            let input = m.wire_input(&g.input);
            let got = self
                .forward(&input)
                .map_err(|e| ModelError::GoldenRun {
                    model: m.id(),
                    index,
                    reason: e.to_string(),
                })?
                .0;
            if m.output.kind == OutputKind::Probabilities {
                if let Some(why) = crate::manifest::not_probabilities(&got) {
                    return Err(ModelError::NotProbabilities {
                        model: m.id(),
                        index,
                        why,
                    });
                }
            }
            for (class, (&expected, &actual)) in g.outputs.iter().zip(&got).enumerate() {
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

    /// Checks dtype and shape; see [`Manifest::check_input`].
    pub fn check_input(&self, input: &Tensor) -> Result<(), InputError> {
        self.manifest.check_input(input)
    }

    /// Runs the model on one input: class probabilities (a logits output softmaxed). 8-bit
    /// values are scaled per `[preprocess]`; FP32 values go to the graph as they are.
    pub fn predict(&self, input: &Tensor) -> Result<Prediction, InputError> {
        let (outputs, compute) = self.forward(input)?;
        let probabilities = self.manifest.probabilities(outputs);
        Ok(Prediction {
            probabilities,
            compute,
        })
    }

    /// The graph's raw output for one input (probabilities or logits, per `output.kind`), and
    /// the forward pass's wall time.
    pub fn forward(&self, input: &Tensor) -> Result<(Vec<f32>, Duration), InputError> {
        let values = self.manifest.model_input(input)?;
        let started = Instant::now();
        let outputs = self
            .run(values)
            .map_err(|e| InputError::Runtime(format!("{e:#}")))?;
        let compute = started.elapsed();
        if outputs.len() != self.labels().len() {
            return Err(InputError::Runtime(format!(
                "model returned {} values for {} labels",
                outputs.len(),
                self.labels().len()
            )));
        }
        if let Some(i) = outputs.iter().position(|x| !x.is_finite()) {
            return Err(InputError::Runtime(format!(
                "model returned a non-finite output for class {i}"
            )));
        }
        Ok((outputs, compute))
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
        let values = m
            .golden
            .first()
            .map(|g| g.input.clone())
            .unwrap_or_else(|| vec![0.0; m.input_elements()]);
        let input = m.wire_input(&values);
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

/// The hex sha256 of `bytes` (what a manifest's `sha256` holds).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// One input or output of an ONNX graph as declared (`None`: a symbolic or unknown dimension).
#[derive(Debug, Clone, PartialEq)]
pub struct GraphTensor {
    pub name: String,
    /// tract's element type (`F32`, `I64`, ...), or `?` when the graph does not say.
    pub dtype: String,
    pub shape: Option<Vec<Option<usize>>>,
}

impl GraphTensor {
    pub fn is_f32(&self) -> bool {
        self.dtype == "F32"
    }
}

/// What an ONNX graph takes and gives.
#[derive(Debug, Clone)]
pub struct Graph {
    pub inputs: Vec<GraphTensor>,
    pub outputs: Vec<GraphTensor>,
}

/// Reads an ONNX graph's inputs and outputs with tract. With `input_shape`, the (single) input
/// is fixed to it and the outputs' shapes are the ones tract infers from it.
pub fn inspect_graph(bytes: &[u8], input_shape: Option<&[usize]>) -> Result<Graph, String> {
    let run = || -> TractResult<Graph> {
        let model = tract_onnx::onnx()
            .with_ignore_value_info(true)
            .model_for_read(&mut std::io::Cursor::new(bytes))?;
        let name_of = |m: &InferenceModel, o: OutletId| {
            m.outlet_label(o)
                .map(str::to_owned)
                .unwrap_or_else(|| m.node(o.node).name.clone())
        };
        let declared = |m: &InferenceModel, o: OutletId| -> TractResult<GraphTensor> {
            let fact = m.outlet_fact(o)?;
            let shape = if fact.shape.is_open() {
                None
            } else {
                Some(
                    fact.shape
                        .dims()
                        .map(|d| d.concretize().and_then(|d| d.to_usize().ok()))
                        .collect(),
                )
            };
            Ok(GraphTensor {
                name: name_of(m, o),
                dtype: fact
                    .datum_type
                    .concretize()
                    .map(|t| format!("{t:?}"))
                    .unwrap_or_else(|| "?".into()),
                shape,
            })
        };
        let inputs = model
            .input_outlets()?
            .iter()
            .map(|&o| declared(&model, o))
            .collect::<TractResult<Vec<_>>>()?;
        let Some(shape) = input_shape else {
            let outputs = model
                .output_outlets()?
                .iter()
                .map(|&o| declared(&model, o))
                .collect::<TractResult<Vec<_>>>()?;
            return Ok(Graph { inputs, outputs });
        };
        let names: Vec<String> = model
            .output_outlets()?
            .iter()
            .map(|&o| name_of(&model, o))
            .collect();
        let typed = model
            .with_input_fact(0, f32::fact(shape).into())?
            .into_typed()?;
        let outputs = typed
            .output_outlets()?
            .iter()
            .zip(names)
            .map(|(&o, name)| {
                let fact = typed.outlet_fact(o)?;
                Ok(GraphTensor {
                    name,
                    dtype: format!("{:?}", fact.datum_type),
                    shape: Some(fact.shape.iter().map(|d| d.to_usize().ok()).collect()),
                })
            })
            .collect::<TractResult<Vec<_>>>()?;
        Ok(Graph { inputs, outputs })
    };
    run().map_err(|e| with_hint(format!("{e:#}")))
}

/// A tract error, with what to do about the ones users meet most.
pub(crate) fn with_hint(reason: String) -> String {
    if reason.contains("ZipMap") {
        format!(
            "{reason}; skl2onnx adds a ZipMap (a list of dicts tract does not run) unless told \
             not to: convert with options={{id(model): {{\"zipmap\": False}}}} (or \
             options={{\"zipmap\": False}})"
        )
    } else {
        reason
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
