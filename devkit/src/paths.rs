//! Paths in the workspace, independent of the current directory.

use std::path::{Path, PathBuf};

/// The committed edge model manifest, relative to the workspace root.
pub const EDGE_MANIFEST: &str = "models/edge/digits-edge.toml";
/// The committed cloud model manifest, relative to the workspace root.
pub const CLOUD_MANIFEST: &str = "models/cloud/digits-cloud.toml";

/// The workspace root (absolute: the parent of this crate's folder, fixed at build time).
pub fn repo_root() -> PathBuf {
    let devkit = Path::new(env!("CARGO_MANIFEST_DIR"));
    devkit
        .parent()
        .map_or_else(|| devkit.join(".."), Path::to_path_buf)
}

/// `rel` (a `/`-separated path such as `models/eval/stream.bin`) under the workspace root.
pub fn repo_path(rel: &str) -> PathBuf {
    repo_root().join(rel)
}

/// The breast-cancer evaluation stream (`models/eval/breast-stream.npy`, float32
/// `[rows, features]`) as rows, and its labels (`breast-stream-labels.npy`, int64).
pub fn breast_stream() -> std::io::Result<(Vec<Vec<f32>>, Vec<i64>)> {
    let read = |name: &str| std::fs::read(repo_path(&format!("models/eval/{name}")));
    let x = read("breast-stream.npy")?;
    let npy = npyz::NpyFile::new(&x[..])?;
    let features = npy.shape().get(1).copied().unwrap_or(1).max(1) as usize;
    let flat: Vec<f32> = npy.into_vec()?;
    let y = read("breast-stream-labels.npy")?;
    let labels: Vec<i64> = npyz::NpyFile::new(&y[..])?.into_vec()?;
    Ok((flat.chunks(features).map(<[f32]>::to_vec).collect(), labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_holds_the_workspace_and_its_models() {
        let root = repo_root();
        assert!(root.is_absolute());
        assert!(root.join("Cargo.toml").is_file());
        assert!(root.join("devkit").is_dir());
        assert!(repo_path(EDGE_MANIFEST).is_file());
        assert!(repo_path(CLOUD_MANIFEST).is_file());
        assert_eq!(repo_path("a/b"), root.join("a").join("b"));
    }
}
