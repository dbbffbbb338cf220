//! Model releases for the tools that show or measure a rollout: a committed model copied under
//! another name and version, with its manifest signed by a model-release key, as an operator
//! would ship it (`edge-agent model sign`).

use std::path::{Path, PathBuf};

use thiserror::Error;
use tierd_protocol::Signer;

#[derive(Debug, Error)]
pub enum ReleaseError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: not a manifest: {1}")]
    Manifest(PathBuf, String),
}

/// The manifest `src` and its ONNX file copied to `dir/<name>@<version>/` as model
/// `name@version`, the manifest signed by `signer` (`<manifest>.sig` beside it). Returns the
/// new manifest's path.
pub fn signed_copy(
    src: &Path,
    name: &str,
    version: &str,
    dir: &Path,
    signer: &Signer,
) -> Result<PathBuf, ReleaseError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ReleaseError::Io { path, source }
    };
    let text = std::fs::read_to_string(src).map_err(io(src))?;
    let mut m: toml::Table =
        toml::from_str(&text).map_err(|e| ReleaseError::Manifest(src.into(), e.to_string()))?;
    m.insert("name".into(), name.into());
    m.insert("version".into(), version.into());
    let file = m
        .get("file")
        .and_then(|f| f.as_str())
        .ok_or_else(|| ReleaseError::Manifest(src.into(), "no file".into()))?
        .to_string();
    let out = dir.join(format!("{name}@{version}"));
    std::fs::create_dir_all(&out).map_err(io(&out))?;
    let from = src.with_file_name(&file);
    std::fs::copy(&from, out.join(&file)).map_err(io(&from))?;
    let manifest = out.join(format!("{name}.toml"));
    let text =
        toml::to_string(&m).map_err(|e| ReleaseError::Manifest(src.into(), e.to_string()))?;
    std::fs::write(&manifest, &text).map_err(io(&manifest))?;
    let sig = tierd_runtime::signature_path(&manifest);
    std::fs::write(&sig, signer.sign_manifest(text.as_bytes())).map_err(io(&sig))?;
    Ok(manifest)
}
