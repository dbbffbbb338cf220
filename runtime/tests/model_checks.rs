//! Model integrity: what `Model::load` accepts and refuses, and the input checks, on copies of
//! the committed models.

use std::path::{Path, PathBuf};
use tierd_protocol::top1;

use serde::Deserialize;
use tierd_protocol::{Tensor, TensorData, TensorError};
use tierd_runtime::{InputError, Model, ModelError};

const TOL: f32 = 1e-4;

fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

/// Copies `edge/` and `cloud/` models (onnx + toml) into a fresh temp dir (flat).
fn copy_models() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for (sub, name) in [("edge", "digits-edge"), ("cloud", "digits-cloud")] {
        for ext in ["toml", "onnx"] {
            let f = format!("{name}.{ext}");
            std::fs::copy(models_dir().join(sub).join(&f), dir.path().join(&f))
                .unwrap_or_else(|e| panic!("copy {f}: {e}"));
        }
    }
    dir
}

fn read_toml(path: &Path) -> toml::Table {
    toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn write_toml(path: &Path, t: &toml::Table) {
    std::fs::write(path, toml::to_string(t).unwrap()).unwrap();
}

#[derive(Deserialize)]
struct Example {
    name: String,
    label: usize,
    pixels: Vec<u8>,
    edge_probabilities: Vec<f32>,
    cloud_probabilities: Vec<f32>,
}

#[derive(Deserialize)]
struct Examples {
    example: Vec<Example>,
}

fn examples() -> Vec<Example> {
    let text = std::fs::read_to_string(models_dir().join("eval/examples.toml")).unwrap();
    let e: Examples = toml::from_str(&text).unwrap();
    assert!(e.example.len() >= 2);
    e.example
}

fn u8_tensor(shape: &[u32], pixels: Vec<u8>) -> Tensor {
    Tensor {
        shape: shape.to_vec(),
        data: TensorData::U8(pixels),
    }
}

fn assert_close(got: &[f32], expected: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), expected.len(), "{what}: {got:?}");
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert!(
            (g - e).abs() <= tol,
            "{what}: class {i} is {g}, expected {e}\n got      {got:?}\n expected {expected:?}"
        );
    }
}

#[test]
fn committed_models_load_from_a_copy() {
    let dir = copy_models();
    let edge = Model::load(&dir.path().join("digits-edge.toml")).expect("edge loads");
    assert_eq!(edge.id(), "digits-edge@2.0.0");
    assert_eq!(edge.labels().len(), 10);
    assert_eq!(edge.manifest().golden.len(), 6);
    let cloud = Model::load(&dir.path().join("digits-cloud.toml")).expect("cloud loads");
    assert_eq!(cloud.id(), "digits-cloud@1.0.0");
    assert_eq!(cloud.manifest().input.shape, vec![1, 64]);
    // And straight from the repository.
    Model::load(&models_dir().join("edge/digits-edge.toml")).expect("edge loads in place");
}

#[test]
fn flipped_byte_fails_the_checksum() {
    let dir = copy_models();
    for name in ["digits-edge", "digits-cloud"] {
        let onnx = dir.path().join(format!("{name}.onnx"));
        let mut bytes = std::fs::read(&onnx).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x80;
        std::fs::write(&onnx, &bytes).unwrap();
        let err = Model::load(&dir.path().join(format!("{name}.toml"))).unwrap_err();
        match &err {
            ModelError::Checksum {
                path,
                expected,
                actual,
            } => {
                assert_eq!(path, &onnx);
                assert_ne!(expected, actual);
                assert_eq!(actual.len(), 64);
            }
            other => panic!("{name}: expected a checksum error, got {other:?}"),
        }
        assert!(err.to_string().contains("sha256"), "{err}");
    }
}

#[test]
fn edited_golden_probability_is_a_golden_mismatch_naming_the_vector() {
    let dir = copy_models();
    let path = dir.path().join("digits-edge.toml");
    let mut t = read_toml(&path);
    let golden = t["golden"].as_array_mut().unwrap();
    let probs = golden[2]["outputs"].as_array_mut().unwrap();
    // Move half the mass from class 2 to class 3: still probabilities, no longer this model's.
    let (v2, v3) = (probs[2].as_float().unwrap(), probs[3].as_float().unwrap());
    probs[2] = toml::Value::Float(v2 - 0.5);
    probs[3] = toml::Value::Float(v3 + 0.5);
    write_toml(&path, &t);

    let err = Model::load(&path).unwrap_err();
    match &err {
        ModelError::GoldenMismatch {
            model,
            index,
            class,
            diff,
            tolerance,
            ..
        } => {
            assert_eq!(model, "digits-edge@2.0.0");
            assert_eq!(*index, 2);
            assert_eq!(*class, 2);
            assert!(*diff > 0.49 && *diff < 0.51, "{diff}");
            assert!(*tolerance < 0.01);
        }
        other => panic!("expected a golden mismatch, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("golden vector 2"), "{msg}");
    assert!(msg.contains("class 2"), "{msg}");
}

#[test]
fn the_wrong_model_file_for_a_manifest_is_a_golden_mismatch() {
    let dir = copy_models();
    let cloud = read_toml(&dir.path().join("digits-cloud.toml"));
    let path = dir.path().join("digits-edge.toml");
    let mut edge = read_toml(&path);
    edge.insert("file".into(), "digits-cloud.onnx".into());
    edge.insert("sha256".into(), cloud["sha256"].clone());
    write_toml(&path, &edge);

    let err = Model::load(&path).unwrap_err();
    // (Golden vector 0 is a clear "0" that both models answer with ~1.0, so the mismatch shows
    // on a later vector.)
    assert!(
        matches!(err, ModelError::GoldenMismatch { .. }),
        "expected a golden mismatch, got {err:?}"
    );
    assert!(err.to_string().contains("digits-edge@2.0.0"), "{err}");
}

#[test]
fn a_manifest_without_golden_vectors_is_refused() {
    let dir = copy_models();
    let path = dir.path().join("digits-edge.toml");
    let mut t = read_toml(&path);
    t.remove("golden");
    write_toml(&path, &t);
    let err = Model::load(&path).unwrap_err().to_string();
    assert!(err.contains("no [[golden]] vectors"), "{err}");
    assert!(err.contains("model init"), "{err}");
}

#[test]
fn inputs_of_the_wrong_shape_type_or_batch_are_refused() {
    let edge = Model::load(&models_dir().join("edge/digits-edge.toml")).unwrap();
    let px = examples()[0].pixels.clone();

    let bad_shape = u8_tensor(&[1, 63], px[..63].to_vec());
    let err = edge.check_input(&bad_shape).unwrap_err();
    assert!(
        matches!(&err, InputError::Shape { got, expected, .. } if got == &[1, 63] && expected == &[1, 64]),
        "{err:?}"
    );
    assert_eq!(edge.predict(&bad_shape).unwrap_err(), err);

    let other_shape = u8_tensor(&[2, 32], px.clone());
    assert!(matches!(
        edge.check_input(&other_shape),
        Err(InputError::Shape { .. })
    ));
    assert!(matches!(
        edge.predict(&u8_tensor(&[8, 8], px.clone())),
        Err(InputError::Shape { .. })
    ));

    let batch: Vec<u8> = px.iter().chain(&px).copied().collect();
    let batch2 = u8_tensor(&[2, 64], batch);
    assert_eq!(edge.check_input(&batch2), Err(InputError::Batch(2)));
    assert_eq!(edge.predict(&batch2).unwrap_err(), InputError::Batch(2));

    let short = u8_tensor(&[1, 64], px[..10].to_vec());
    assert!(matches!(
        edge.predict(&short),
        Err(InputError::Tensor(TensorError::ElementCount {
            expected: 64,
            got: 10,
            ..
        }))
    ));

    let nan = Tensor {
        shape: vec![1, 64],
        data: TensorData::F32(vec![f32::NAN; 64]),
    };
    assert!(matches!(
        edge.predict(&nan),
        Err(InputError::Tensor(TensorError::NonFinite(0)))
    ));

    // Both accepted shapes give the same answer.
    let a = edge.predict(&u8_tensor(&[1, 64], px.clone())).unwrap();
    let b = edge.predict(&u8_tensor(&[64], px.clone())).unwrap();
    assert_eq!(a.probabilities, b.probabilities);
}

#[test]
fn a_wire_dtype_the_manifest_does_not_accept_is_refused() {
    // UINT8 and FP32 are the only tensor types on the wire and the committed models accept both,
    // so the dtype check needs a model whose wire type is FP32: then raw UINT8 is refused.
    let dir = copy_models();
    let path = dir.path().join("digits-edge.toml");
    let mut t = read_toml(&path);
    // An FP32-wire model has no [preprocess]: its golden inputs are the model's own input.
    let scale = t["preprocess"]["scale"].as_float().unwrap();
    t.remove("preprocess");
    for g in t["golden"].as_array_mut().unwrap() {
        let input = g["input"].as_array_mut().unwrap();
        for v in input.iter_mut() {
            let x = v.as_float().or(v.as_integer().map(|i| i as f64)).unwrap();
            *v = toml::Value::Float(x * scale);
        }
    }
    write_toml(&path, &t);
    let model = Model::load(&path).expect("loads");
    let px = examples()[0].pixels.clone();
    let err = model.predict(&u8_tensor(&[1, 64], px)).unwrap_err();
    assert_eq!(
        err,
        InputError::Dtype {
            got: "UINT8",
            wire: "FP32"
        }
    );
    assert!(err.to_string().contains("UINT8"), "{err}");
}

#[test]
fn predictions_match_the_recorded_examples() {
    let edge = Model::load(&models_dir().join("edge/digits-edge.toml")).unwrap();
    let cloud = Model::load(&models_dir().join("cloud/digits-cloud.toml")).unwrap();
    let scale = edge.manifest().preprocess.as_ref().unwrap().scale;
    let mut confident = 0;
    for ex in examples() {
        let input = u8_tensor(&[1, 64], ex.pixels.clone());
        let e = edge.predict(&input).unwrap().probabilities;
        assert_close(
            &e,
            &ex.edge_probabilities,
            TOL,
            &format!("edge {}", ex.name),
        );
        let c = cloud.predict(&input).unwrap().probabilities;
        assert_close(
            &c,
            &ex.cloud_probabilities,
            TOL,
            &format!("cloud {}", ex.name),
        );
        let sum: f32 = e.iter().sum();
        assert!((sum - 1.0).abs() < 1e-3, "{}: edge sums to {sum}", ex.name);
        assert_eq!(top1(&c), ex.label, "{}: cloud top-1", ex.name);
        if ex.name.starts_with("confident") {
            confident += 1;
            assert_eq!(top1(&e), ex.label, "{}: edge top-1", ex.name);
        } else {
            assert_ne!(top1(&e), ex.label, "{}: the edge should be wrong", ex.name);
        }
        // FP32 input is taken as already preprocessed: the same pixels scaled give the same answer.
        let f = Tensor {
            shape: vec![1, 64],
            data: TensorData::F32(ex.pixels.iter().map(|&p| f32::from(p) * scale).collect()),
        };
        let ef = edge.predict(&f).unwrap().probabilities;
        assert_close(&ef, &e, 1e-6, &format!("edge FP32 {}", ex.name));
    }
    assert!(confident > 0);
}

#[test]
fn a_logits_model_declared_as_probabilities_is_refused_with_a_hint() {
    // breast-edge outputs logits. Declared as probabilities, with golden outputs that look
    // like probabilities (its own softmaxed), the load must still refuse it: the model's real
    // output does not sum to 1.
    let dir = tempfile::tempdir().expect("dir");
    for f in ["breast-edge.toml", "breast-edge.onnx"] {
        std::fs::copy(models_dir().join("edge").join(f), dir.path().join(f)).expect("copy");
    }
    let path = dir.path().join("breast-edge.toml");
    let mut t = read_toml(&path);
    t["output"]
        .as_table_mut()
        .unwrap()
        .insert("kind".into(), "probabilities".into());
    for g in t["golden"].as_array_mut().unwrap() {
        let logits: Vec<f32> = g["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_float().unwrap() as f32)
            .collect();
        let p = tierd_runtime::softmax(&logits);
        g.as_table_mut().unwrap().insert(
            "outputs".into(),
            toml::Value::Array(
                p.iter()
                    .map(|&x| toml::Value::Float(f64::from(x)))
                    .collect(),
            ),
        );
    }
    write_toml(&path, &t);
    let err = Model::load(&path).unwrap_err();
    assert!(
        matches!(err, ModelError::NotProbabilities { index: 0, .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("set output.kind = \"logits\""), "{msg}");

    // As shipped (kind = "logits") it loads, and answers softmaxed probabilities.
    let m = Model::load(&models_dir().join("edge/breast-edge.toml")).expect("loads");
    let g = &m.manifest().golden[0];
    let p = m
        .predict(&m.manifest().wire_input(&g.input))
        .unwrap()
        .probabilities;
    assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{p:?}");
    let want = tierd_runtime::softmax(&g.outputs);
    assert_close(&p, &want, 1e-4, "softmax of the golden logits");
}
