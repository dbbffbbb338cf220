//! Sizes of the release binaries on disk (the release profile strips symbols).

use std::path::{Path, PathBuf};

use crate::rss::release_dir;
use tierd_devkit::repo_path;

pub const AARCH64: &str = "aarch64-unknown-linux-gnu";

pub struct Binary {
    pub label: String,
    pub path: PathBuf,
    /// `None` when the file does not exist.
    pub bytes: Option<u64>,
    /// `file -b` output, when `file` is installed.
    pub file: Option<String>,
}

fn describe(label: String, path: PathBuf) -> Binary {
    let bytes = std::fs::metadata(&path)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len());
    let file = bytes.and_then(|_| file_type(&path));
    Binary {
        label,
        path,
        bytes,
        file,
    }
}

fn file_type(path: &Path) -> Option<String> {
    let out = std::process::Command::new("file")
        .arg("-b")
        .arg(path)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Places the aarch64 build may be, in order of preference.
pub fn aarch64_candidates() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(PathBuf::from("/var/cache/tierd/target"));
    dirs.push(repo_path("target"));
    dirs.into_iter()
        .map(|d| d.join(AARCH64).join("release").join("edge-agent"))
        .collect()
}

pub fn collect() -> anyhow::Result<Vec<Binary>> {
    let rel = release_dir()?;
    let mut out = vec![
        describe("edge-agent (x86_64)".into(), rel.join("edge-agent")),
        describe("cloud-relay (x86_64)".into(), rel.join("cloud-relay")),
    ];
    let candidates = aarch64_candidates();
    let found = candidates.iter().find(|p| p.is_file()).cloned();
    out.push(describe(
        "edge-agent (aarch64)".into(),
        found.unwrap_or_else(|| candidates[0].clone()),
    ));
    Ok(out)
}
