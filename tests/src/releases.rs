//! Model releases for the rollout tests: a model-release key made with the real
//! `edge-agent model keygen`, manifests signed with `edge-agent model sign`, and
//! `cloud-relay rollout …` run against a test relay.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::processes::bin_path;
use crate::relay::RelayProc;

/// A command's stdout and stderr together, for assertions and failure messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs the `edge-agent` binary with `args`.
pub fn edge_agent(args: &[&str]) -> Output {
    Command::new(bin_path("edge-agent"))
        .args(args)
        .output()
        .expect("edge-agent")
}

/// A model-release key pair in `dir` (`{name}.pk8`): the key file and its public key.
pub fn release_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(format!("{name}.pk8"));
    let out = edge_agent(&["model", "keygen", "--out", key.to_str().expect("utf-8")]);
    assert!(out.status.success(), "keygen: {}", output_text(&out));
    (key, String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Signs `manifest` with `key` (writes `<manifest>.sig`).
pub fn sign_manifest(manifest: &Path, key: &Path) {
    let out = edge_agent(&[
        "model",
        "sign",
        "--key",
        key.to_str().expect("utf-8"),
        manifest.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "sign: {}", output_text(&out));
}

/// `cloud-relay rollout <args>` against `relay`'s API, with its token.
pub fn rollout_cli(relay: &RelayProc, args: &[&str]) -> Output {
    Command::new(bin_path("cloud-relay"))
        .arg("rollout")
        .args(args)
        .args(["--api", &relay.url(""), "--token-file"])
        .arg(&relay.token_file)
        .output()
        .expect("cloud-relay")
}
