//! `edge-agent model init`: a manifest for any single-input ONNX classifier.
//!
//! What it reads from where:
//! - the graph (tract): input name, shape and element type; the output holding one value per
//!   class (the only FP32 output, or the one `--output-name` names); the class count from the
//!   output's shape with the input fixed to one request;
//! - the file: its sha256;
//! - the samples (`.npy` or CSV, one input per row, in wire values): the golden vectors, the
//!   model's raw output on the first `--golden` rows as computed by tract here;
//! - the outputs: `probabilities` when every sample's outputs lie in [0, 1] and sum to 1, else
//!   `logits` (softmaxed before confidence), unless `--output` says which.
//!
//! The manifest is checked exactly as the agent will check it (parse, sha256, golden vectors)
//! before it is written, so `check-model` and `run` accept it unchanged.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tierd_runtime::{
    inspect_graph, sha256_hex, Dtype, Golden, GraphTensor, InputSpec, Manifest, Model, OutputKind,
    OutputSpec, Preprocess,
};

/// What `model init` is told (its command-line arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct InitOptions {
    /// The ONNX file (one FP32 input; an output with one value per class).
    pub model: PathBuf,
    /// Sample inputs in wire values, one per row: `.npy` ([rows, features]) or CSV.
    #[arg(long)]
    pub samples: PathBuf,
    /// Where to write the manifest (`file` is relative to its folder when the model is in it).
    #[arg(long)]
    pub out: PathBuf,
    /// Model name (default: the file name without `.onnx`).
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, default_value = "1.0.0")]
    pub version: String,
    #[arg(long, default_value = "")]
    pub description: String,
    /// Class labels in output order, comma-separated (default 0, 1, ...).
    #[arg(long, value_delimiter = ',', conflicts_with = "labels_file")]
    pub labels: Option<Vec<String>>,
    /// Class labels, one per line.
    #[arg(long)]
    pub labels_file: Option<PathBuf>,
    /// What the output holds (default: detected from the samples' outputs).
    #[arg(long, value_parser = parse_output_kind)]
    pub output: Option<OutputKind>,
    /// The graph output to use when it has several FP32 outputs.
    #[arg(long)]
    pub output_name: Option<String>,
    /// Clients send UINT8 values: model input = x * scale + offset (the samples are then raw
    /// 0..=255 values). Without it clients send the model's FP32 input as it is.
    #[arg(long)]
    pub input_scale: Option<f32>,
    #[arg(long, default_value_t = 0.0, requires = "input_scale")]
    pub input_offset: f32,
    /// Golden vectors to write (the first sample rows).
    #[arg(long, default_value_t = 5)]
    pub golden: usize,
    /// Largest difference per output the agent tolerates on a golden vector.
    #[arg(long, default_value_t = 1e-4)]
    pub tolerance: f32,
    /// Overwrite an existing manifest.
    #[arg(long)]
    pub force: bool,
}

fn parse_output_kind(s: &str) -> Result<OutputKind, String> {
    match s {
        "probabilities" => Ok(OutputKind::Probabilities),
        "logits" => Ok(OutputKind::Logits),
        _ => Err(format!("{s:?}: say probabilities or logits")),
    }
}

/// `--labels`, or the lines of `--labels-file`.
fn labels(opts: &InitOptions) -> anyhow::Result<Option<Vec<String>>> {
    let Some(file) = &opts.labels_file else {
        return Ok(opts.labels.clone());
    };
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    Ok(Some(
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect(),
    ))
}

/// Most sample rows read: golden vectors need only a few, and the kind check a few more.
const MAX_SAMPLE_ROWS: usize = 1000;

/// Writes the manifest `opts` describes and returns it, with notes on what was inferred.
pub fn init(opts: &InitOptions) -> anyhow::Result<(Manifest, Vec<String>)> {
    let mut notes = Vec::new();
    if opts.out.exists() && !opts.force {
        bail!(
            "{} exists; pass --force to overwrite it",
            opts.out.display()
        );
    }
    if opts.golden == 0 {
        bail!("--golden must be at least 1: the agent refuses a manifest without golden vectors");
    }
    let bytes = std::fs::read(&opts.model)
        .with_context(|| format!("cannot read {}", opts.model.display()))?;
    let graph = inspect_graph(&bytes, None).map_err(|e| {
        anyhow::anyhow!(
            "{}: tract cannot read this model: {e}",
            opts.model.display()
        )
    })?;
    let input = single_input(&graph.inputs)?;
    let shape = input_shape(input)?;
    let elements: usize = shape.iter().product();
    let typed = inspect_graph(&bytes, Some(&shape)).map_err(|e| {
        anyhow::anyhow!("{}: tract cannot run this model: {e}", opts.model.display())
    })?;
    let output = pick_output(&typed.outputs, opts.output_name.as_deref())?;
    let classes = class_count(output)?;
    let labels = match labels(opts)? {
        Some(l) if l.len() != classes => bail!(
            "{} labels given but output {:?} has {classes} classes",
            l.len(),
            output.name
        ),
        Some(l) => l,
        None => {
            notes.push(format!(
                "labels 0..{} (pass --labels or --labels-file for names)",
                classes - 1
            ));
            (0..classes).map(|i| i.to_string()).collect()
        }
    };
    let preprocess = opts.input_scale.map(|scale| Preprocess {
        wire_dtype: Dtype::Uint8,
        scale,
        offset: opts.input_offset,
    });
    let rows = read_samples(&opts.samples, elements, MAX_SAMPLE_ROWS)?;
    if preprocess.is_some() {
        check_uint8(&rows, &opts.samples)?;
    }
    let name = match &opts.name {
        Some(n) => n.clone(),
        None => opts
            .model
            .file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_owned)
            .context("cannot derive a model name from the file name; pass --name")?,
    };
    let out_dir = opts
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut manifest = Manifest {
        name,
        version: opts.version.clone(),
        description: opts.description.clone(),
        file: relative_file(&opts.model, out_dir)?,
        sha256: sha256_hex(&bytes),
        input: InputSpec {
            name: input.name.clone(),
            shape: shape.clone(),
            dtype: Dtype::Fp32,
        },
        preprocess,
        output: OutputSpec {
            name: output.name.clone(),
            kind: opts.output.unwrap_or(OutputKind::Probabilities),
            labels,
        },
        calibration: None,
        golden: Vec::new(),
        dir: out_dir.to_owned(),
    };
    // The raw outputs, from the model compiled exactly as the agent compiles it.
    let model = Model::compile_unverified(manifest.clone())
        .with_context(|| format!("cannot load {}", opts.model.display()))?;
    let mut outputs = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let (out, _) = model
            .forward(&manifest.wire_input(row))
            .map_err(|e| anyhow::anyhow!("sample row {}: {e}", i + 1))?;
        outputs.push(out);
    }
    let all_probabilities = outputs
        .iter()
        .all(|o| tierd_runtime::not_probabilities(o).is_none());
    manifest.output.kind = match opts.output {
        Some(OutputKind::Probabilities) if !all_probabilities => {
            let why = outputs
                .iter()
                .find_map(|o| tierd_runtime::not_probabilities(o))
                .unwrap_or_default();
            bail!(
                "--output probabilities, but the model's output on a sample {why}; it looks like \
                 logits: pass --output logits"
            )
        }
        Some(OutputKind::Logits) if all_probabilities => {
            notes.push(
                "--output logits, though every sample's outputs look like probabilities: they \
                 will be softmaxed again, which flattens confidence"
                    .into(),
            );
            OutputKind::Logits
        }
        Some(k) => k,
        None if all_probabilities => {
            notes.push(format!(
                "output kind probabilities: on all {} samples the outputs lie in [0, 1] and sum \
                 to 1 (pass --output logits if they are scores)",
                outputs.len()
            ));
            OutputKind::Probabilities
        }
        None => {
            notes.push(
                "output kind logits: the outputs are not probabilities, so they are softmaxed \
                 before confidence (pass --output to say otherwise)"
                    .into(),
            );
            OutputKind::Logits
        }
    };
    let confidences: Vec<f32> = outputs
        .iter()
        .map(|o| {
            manifest
                .probabilities(o.clone())
                .into_iter()
                .fold(0.0f32, f32::max)
        })
        .collect();
    manifest.golden = spread_by_confidence(&confidences, opts.golden)
        .into_iter()
        .map(|i| Golden {
            input: rows[i].clone(),
            outputs: outputs[i].clone(),
            tolerance: opts.tolerance,
        })
        .collect();
    if manifest.golden.len() < opts.golden {
        notes.push(format!(
            "{} golden vectors (the samples hold {} rows)",
            manifest.golden.len(),
            rows.len()
        ));
    }
    let text = manifest.to_toml().map_err(|e| anyhow::anyhow!("{e}"))?;
    // The same checks the agent makes at start, on the very text written.
    let checked = Manifest::from_text(&opts.out, &text)?;
    Model::from_manifest(checked.clone())?;
    write_atomically(&opts.out, &text)?;
    Ok((checked, notes))
}

/// Indices of `n` rows spread evenly over the range of confidence (lowest to highest, in
/// sample order among equals), so the golden vectors check unsure inputs too, where a runtime
/// that computes slightly wrong results flips answers, not only confident ones.
fn spread_by_confidence(confidences: &[f32], n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..confidences.len()).collect();
    order.sort_by(|&a, &b| confidences[a].total_cmp(&confidences[b]).then(a.cmp(&b)));
    let n = n.min(order.len());
    let mut picked: Vec<usize> = (0..n)
        .map(|k| {
            let pos = if n == 1 {
                0
            } else {
                k * (order.len() - 1) / (n - 1)
            };
            order[pos]
        })
        .collect();
    picked.sort_unstable();
    picked.dedup();
    picked
}

fn single_input(inputs: &[GraphTensor]) -> anyhow::Result<&GraphTensor> {
    let [input] = inputs else {
        bail!(
            "the graph has {} inputs ({}); tierd serves models with exactly one",
            inputs.len(),
            inputs
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    if input.dtype != "F32" && input.dtype != "?" {
        bail!(
            "input {:?} is {}; tierd feeds models FP32 input (cast in the graph, e.g. skl2onnx's \
             FloatTensorType)",
            input.name,
            input.dtype
        );
    }
    Ok(input)
}

/// The input's shape for one request: a symbolic first (batch) dimension becomes 1.
fn input_shape(input: &GraphTensor) -> anyhow::Result<Vec<usize>> {
    let Some(dims) = &input.shape else {
        bail!("input {:?} has no declared shape", input.name)
    };
    if dims.is_empty() {
        bail!(
            "input {:?} is a scalar; tierd needs [batch, ...]",
            input.name
        );
    }
    let mut shape = Vec::with_capacity(dims.len());
    for (i, d) in dims.iter().enumerate() {
        match (i, d) {
            (0, None | Some(1)) => shape.push(1),
            (0, Some(b)) => bail!(
                "input {:?} has a fixed batch of {b}; tierd sends one request at a time (export \
                 with a batch dimension of 1 or None)",
                input.name
            ),
            (_, Some(d)) if *d > 0 => shape.push(*d),
            _ => bail!(
                "input {:?} has an unknown dimension {i} ({dims:?}); export it with a fixed size",
                input.name
            ),
        }
    }
    Ok(shape)
}

fn pick_output<'a>(
    outputs: &'a [GraphTensor],
    named: Option<&str>,
) -> anyhow::Result<&'a GraphTensor> {
    let list = || {
        outputs
            .iter()
            .map(|o| format!("{} ({})", o.name, o.dtype))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(n) = named {
        let o = outputs
            .iter()
            .find(|o| o.name == n)
            .with_context(|| format!("the graph has no output {n:?}; it has {}", list()))?;
        if !o.is_f32() {
            bail!("output {n:?} is {}, not FP32 class scores", o.dtype);
        }
        return Ok(o);
    }
    let floats: Vec<&GraphTensor> = outputs.iter().filter(|o| o.is_f32()).collect();
    match floats.as_slice() {
        [one] => Ok(one),
        [] => bail!("the graph has no FP32 output (outputs: {})", list()),
        many => many
            .iter()
            .find(|o| {
                matches!(
                    o.name.as_str(),
                    "probabilities" | "probability" | "output_probability" | "logits"
                )
            })
            .copied()
            .with_context(|| {
                format!(
                    "the graph has several FP32 outputs ({}); pass --output-name",
                    list()
                )
            }),
    }
}

fn class_count(output: &GraphTensor) -> anyhow::Result<usize> {
    let dims = output.shape.as_deref().unwrap_or_default();
    let classes = dims.iter().copied().flatten().product::<usize>();
    let known = dims.iter().all(Option::is_some);
    if !known || classes < 2 {
        bail!(
            "output {:?} has shape {dims:?} for one input; tierd needs one value per class, at \
             least two",
            output.name
        );
    }
    Ok(classes)
}

fn check_uint8(rows: &[Vec<f32>], path: &Path) -> anyhow::Result<()> {
    for (i, row) in rows.iter().enumerate() {
        if let Some(v) = row
            .iter()
            .find(|v| v.fract() != 0.0 || !(0.0..=255.0).contains(*v))
        {
            bail!(
                "{} row {}: {v} is not a UINT8 wire value; with --input-scale the samples are \
                 the raw 0..=255 values clients send",
                path.display(),
                i + 1
            );
        }
    }
    Ok(())
}

/// The model's path as the manifest's `file`: relative to the manifest's folder when the model
/// lies inside it, else absolute.
fn relative_file(model: &Path, out_dir: &Path) -> anyhow::Result<PathBuf> {
    let model = std::fs::canonicalize(model)
        .with_context(|| format!("cannot resolve {}", model.display()))?;
    let dir = std::fs::canonicalize(out_dir)
        .with_context(|| format!("the manifest's folder {} does not exist", out_dir.display()))?;
    Ok(model
        .strip_prefix(&dir)
        .map(Path::to_owned)
        .unwrap_or(model))
}

fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Reads up to `max_rows` inputs of `elements` values each: a `.npy` array of shape
/// `[rows, elements]` (or `[rows, ...]` with that many per row), else CSV or whitespace
/// separated text, one input per line (`#` comments and one header line allowed).
pub fn read_samples(
    path: &Path,
    elements: usize,
    max_rows: usize,
) -> anyhow::Result<Vec<Vec<f32>>> {
    let rows = if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"))
    {
        read_npy(path, elements)?
    } else {
        read_text(path, elements, max_rows)?
    };
    if rows.is_empty() {
        bail!("{} holds no samples", path.display());
    }
    if let Some((i, _)) = rows
        .iter()
        .enumerate()
        .find(|(_, r)| r.iter().any(|v| !v.is_finite()))
    {
        bail!("{} row {}: not a finite number", path.display(), i + 1);
    }
    Ok(rows.into_iter().take(max_rows).collect())
}

fn read_npy(path: &Path, elements: usize) -> anyhow::Result<Vec<Vec<f32>>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .with_context(|| format!("cannot read {}", path.display()))?;
    let npy = npyz::NpyFile::new(&bytes[..])
        .with_context(|| format!("{} is not a NumPy .npy file", path.display()))?;
    if npy.order() != npyz::Order::C {
        bail!(
            "{}: Fortran-ordered arrays are not supported; save np.ascontiguousarray(x)",
            path.display()
        );
    }
    let shape = npy.shape().to_vec();
    let per_row: u64 = shape.iter().skip(1).product();
    if shape.len() < 2 || per_row != elements as u64 {
        bail!(
            "{} holds an array of shape {shape:?}; expected [rows, {elements}] (one input per row)",
            path.display()
        );
    }
    let dtype = npy.dtype().descr().trim_matches('\'').to_owned();
    let ctx = || format!("cannot read the {dtype} data of {}", path.display());
    let flat: Vec<f32> = match dtype.trim_start_matches(['<', '>', '|', '=']) {
        "f4" => npy.into_vec::<f32>().with_context(ctx)?,
        "f8" => npy
            .into_vec::<f64>()
            .with_context(ctx)?
            .into_iter()
            .map(|v| v as f32)
            .collect(),
        "u1" => npy
            .into_vec::<u8>()
            .with_context(ctx)?
            .into_iter()
            .map(f32::from)
            .collect(),
        "i8" => npy
            .into_vec::<i64>()
            .with_context(ctx)?
            .into_iter()
            .map(|v| v as f32)
            .collect(),
        "i4" => npy
            .into_vec::<i32>()
            .with_context(ctx)?
            .into_iter()
            .map(|v| v as f32)
            .collect(),
        other => bail!(
            "{}: element type {other} is not supported (float32, float64, uint8, int32, int64)",
            path.display()
        ),
    };
    Ok(flat.chunks(elements).map(<[f32]>::to_vec).collect())
}

fn read_text(path: &Path, elements: usize, max_rows: usize) -> anyhow::Result<Vec<Vec<f32>>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read {} as text (CSV, or a .npy file)",
            path.display()
        )
    })?;
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line
            .split(|c: char| c == ',' || c == ';' || c.is_whitespace())
            .filter(|f| !f.is_empty())
            .collect();
        let parsed: Result<Vec<f32>, _> = fields.iter().map(|f| f.parse::<f32>()).collect();
        let Ok(values) = parsed else {
            if rows.is_empty() && n == 0 {
                continue; // a header line
            }
            bail!("{} line {}: not a row of numbers", path.display(), n + 1);
        };
        if values.len() != elements {
            bail!(
                "{} line {}: {} values, but the model's input holds {elements} (one input per \
                 row; drop any label column)",
                path.display(),
                n + 1,
                values.len()
            );
        }
        rows.push(values);
        if rows.len() >= max_rows {
            break;
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use npyz::WriterBuilder;

    #[test]
    fn golden_rows_span_the_confidence_range() {
        let c = [0.99, 0.5, 0.97, 0.6, 1.0, 0.75, 0.98];
        // Lowest (0.5, row 1), highest (1.0, row 4), and between; returned in sample order.
        assert_eq!(spread_by_confidence(&c, 3), vec![1, 2, 4]);
        assert_eq!(spread_by_confidence(&c, 1), vec![1]);
        assert_eq!(spread_by_confidence(&c, 20).len(), 7);
        assert!(spread_by_confidence(&[], 5).is_empty());
    }

    #[test]
    fn text_samples_skip_a_header_and_name_a_bad_row() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.csv");
        std::fs::write(&p, "a,b,c\n1,2,3\n# note\n4 5 6\n").unwrap();
        assert_eq!(
            read_samples(&p, 3, 10).unwrap(),
            vec![vec![1.0, 2.0, 3.0], vec![4.0, 5.0, 6.0]]
        );
        std::fs::write(&p, "1,2,3\n4,5,6,0\n").unwrap();
        let err = read_samples(&p, 3, 10).unwrap_err().to_string();
        assert!(
            err.contains("line 2: 4 values") && err.contains("label column"),
            "{err}"
        );
        std::fs::write(&p, "1,2,3\n4,x,6\n").unwrap();
        let err = read_samples(&p, 3, 10).unwrap_err().to_string();
        assert!(err.contains("line 2: not a row of numbers"), "{err}");
        std::fs::write(&p, "# nothing\n").unwrap();
        assert!(read_samples(&p, 3, 10)
            .unwrap_err()
            .to_string()
            .contains("no samples"));
    }

    #[test]
    fn npy_samples_of_several_dtypes_are_read_row_by_row() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.npy");
        let mut buf = Vec::new();
        {
            let mut w = npyz::WriteOptions::new()
                .default_dtype()
                .shape(&[2, 3])
                .writer(&mut buf)
                .begin_nd()
                .unwrap();
            w.extend([1.5f64, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
            w.finish().unwrap();
        }
        std::fs::write(&p, &buf).unwrap();
        assert_eq!(
            read_samples(&p, 3, 10).unwrap(),
            vec![vec![1.5, 2.0, 3.0], vec![4.0, 5.0, 6.0]]
        );
        let err = read_samples(&p, 4, 10).unwrap_err().to_string();
        assert!(err.contains("expected [rows, 4]"), "{err}");
        std::fs::write(&p, b"not numpy").unwrap();
        assert!(read_samples(&p, 3, 10)
            .unwrap_err()
            .to_string()
            .contains("not a NumPy"));
    }

    fn tensor(name: &str, dtype: &str, shape: Option<Vec<Option<usize>>>) -> GraphTensor {
        GraphTensor {
            name: name.into(),
            dtype: dtype.into(),
            shape,
        }
    }

    #[test]
    fn shapes_and_outputs_are_picked_or_refused_with_a_reason() {
        let i = tensor("x", "F32", Some(vec![None, Some(30)]));
        assert_eq!(input_shape(&i).unwrap(), vec![1, 30]);
        let fixed = tensor("x", "F32", Some(vec![Some(8), Some(30)]));
        assert!(input_shape(&fixed)
            .unwrap_err()
            .to_string()
            .contains("fixed batch of 8"));
        let open = tensor("x", "F32", Some(vec![None, None]));
        assert!(input_shape(&open)
            .unwrap_err()
            .to_string()
            .contains("unknown dimension 1"));
        let ints = tensor("x", "I64", Some(vec![None, Some(4)]));
        assert!(single_input(std::slice::from_ref(&ints))
            .unwrap_err()
            .to_string()
            .contains("FP32"));

        // skl2onnx with zipmap=False: an I64 label and FP32 probabilities.
        let outs = [
            tensor("label", "I64", Some(vec![Some(1)])),
            tensor("probabilities", "F32", Some(vec![Some(1), Some(3)])),
        ];
        let o = pick_output(&outs, None).unwrap();
        assert_eq!(
            (o.name.as_str(), class_count(o).unwrap()),
            ("probabilities", 3)
        );
        assert!(pick_output(&outs, Some("label"))
            .unwrap_err()
            .to_string()
            .contains("not FP32"));
        assert!(pick_output(&outs, Some("nope"))
            .unwrap_err()
            .to_string()
            .contains("has no output"));
        let two = [
            tensor("a", "F32", Some(vec![Some(1), Some(3)])),
            tensor("b", "F32", Some(vec![Some(1), Some(3)])),
        ];
        assert!(pick_output(&two, None)
            .unwrap_err()
            .to_string()
            .contains("--output-name"));
        let one = tensor("p", "F32", Some(vec![Some(1), Some(1)]));
        assert!(class_count(&one).is_err());
    }
}
