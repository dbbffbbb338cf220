//! What the tests feed the daemons and compare against: the committed models and evaluation
//! examples, and TOML paths for the config files they write.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The workspace root.
pub fn repo_root() -> PathBuf {
    tierd_devkit::repo_root()
}

/// The committed edge model manifest (absolute).
pub fn edge_manifest() -> PathBuf {
    tierd_devkit::repo_path(tierd_devkit::EDGE_MANIFEST)
}

/// The committed cloud model manifest (absolute).
pub fn cloud_manifest() -> PathBuf {
    tierd_devkit::repo_path(tierd_devkit::CLOUD_MANIFEST)
}

/// `path` as a TOML string literal.
pub(crate) fn toml_path(path: &Path) -> String {
    toml::Value::String(path.to_string_lossy().into_owned()).to_string()
}

/// A named input from `models/eval/examples.toml` with both models' expected probabilities.
#[derive(Debug, Clone, Deserialize)]
pub struct Example {
    pub name: String,
    pub label: usize,
    pub pixels: Vec<u8>,
    pub edge_probabilities: Vec<f32>,
    pub cloud_probabilities: Vec<f32>,
}

#[derive(Deserialize)]
struct ExampleFile {
    example: Vec<Example>,
}

/// Every example in `models/eval/examples.toml`.
pub fn examples() -> Vec<Example> {
    let path = repo_root().join("models/eval/examples.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let file: ExampleFile =
        toml::from_str(&text).unwrap_or_else(|e| panic!("cannot parse {}: {e}", path.display()));
    assert!(
        !file.example.is_empty(),
        "{} has no examples",
        path.display()
    );
    file.example
}

/// The example called `name`.
pub fn example(name: &str) -> Example {
    examples()
        .into_iter()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("no example named {name:?} in models/eval/examples.toml"))
}

/// Examples the edge model answers confidently (and correctly).
pub fn confident_examples() -> Vec<Example> {
    let v: Vec<_> = examples()
        .into_iter()
        .filter(|e| e.name.starts_with("confident"))
        .collect();
    assert!(!v.is_empty(), "no confident* examples");
    v
}

/// Examples the edge model is unsure about (its top-1 is wrong, the cloud's is right).
pub fn unsure_examples() -> Vec<Example> {
    let v: Vec<_> = examples()
        .into_iter()
        .filter(|e| e.name.starts_with("unsure"))
        .collect();
    assert!(!v.is_empty(), "no unsure* examples");
    v
}

/// Panics unless `got` and `expected` have the same length and differ by at most `tol` anywhere.
pub fn assert_probs_close(got: &[f32], expected: &[f32], tol: f32, what: &str) {
    assert_eq!(
        got.len(),
        expected.len(),
        "{what}: {} probabilities, expected {}: got {got:?}",
        got.len(),
        expected.len()
    );
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        let diff = (g - e).abs();
        assert!(
            diff <= tol,
            "{what}: class {i} is {g}, expected {e} (|diff| {diff:e} > {tol:e})\n got      {got:?}\n expected {expected:?}"
        );
    }
}

/// How long a process may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound for any single HTTP exchange with the agent.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// The log filter every spawned daemon runs with.
pub const RUST_LOG: &str = "info,rumqttd=warn";
/// Log line of the agent once its MQTT session is up.
pub const AGENT_MQTT_READY: &str = "connected to MQTT broker";
/// Log line of the relay once it is connected and has asked for escalations.
pub const RELAY_READY: &str = "connected; taking escalations";
/// Name of the edge model as served over HTTP.
pub const EDGE_MODEL: &str = "digits-edge";
/// Set to `1` to skip (instead of fail) the Mosquitto tests where Mosquitto is not installed.
pub const SKIP_MOSQUITTO_ENV: &str = "TIERD_SKIP_MOSQUITTO";

/// The rows (FP32 features) of the breast-cancer evaluation stream, in file order.
pub fn breast_rows() -> Vec<Vec<f32>> {
    tierd_devkit::breast_stream()
        .expect("models/eval/breast-stream*.npy")
        .0
}

/// The default edge manifest without its `[calibration]` table (a model that ships no
/// offline certificate), written into `dir`.
pub fn uncalibrated_manifest(dir: &std::path::Path) -> std::path::PathBuf {
    let src = edge_manifest();
    let text = std::fs::read_to_string(&src).expect("manifest");
    let mut v: toml::Table = toml::from_str(&text).expect("toml");
    assert!(
        v.remove("calibration").is_some(),
        "the default edge model ships a certificate"
    );
    let onnx = src
        .parent()
        .expect("dir")
        .join(v["file"].as_str().expect("file"));
    v.insert("file".into(), onnx.display().to_string().into());
    let path = dir.join("uncalibrated.toml");
    std::fs::write(&path, toml::to_string(&v).expect("toml")).expect("write");
    path
}
