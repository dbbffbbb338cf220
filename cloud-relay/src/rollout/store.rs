//! The rollouts' files in the relay's state directory:
//!
//! ```text
//! <state_dir>/rollouts.json                 every rollout's state (written atomically after each change)
//! <state_dir>/rollouts/<id>/<name>.toml     the candidate's manifest, its .sig, and its ONNX file
//! ```
//!
//! A rollout's candidate is checked when it is started, before anything is sent: the manifest
//! parses, the ONNX file's sha256 is the one it pins, tract loads it and its golden vectors
//! pass. Devices then fetch the file from here in chunks ([`read_chunk`]).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use thiserror::Error;
use tierd_protocol::rollout::{Release, MAX_CHUNK_BYTES, MAX_MANIFEST_BYTES, MAX_MODEL_BYTES};

use super::{Rollouts, Rules};
use crate::tuner::Setup;

pub const STATE_FILE: &str = "rollouts.json";
pub const DIR: &str = "rollouts";

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a valid rollout state: {reason}", .path.display())]
    State { path: PathBuf, reason: String },
    #[error("candidate: {0}")]
    Candidate(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The persisted rollouts (none when the file does not exist).
pub fn load(state_dir: &Path, setup: Setup, rules: Rules) -> Result<Rollouts, StoreError> {
    let path = state_dir.join(STATE_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Rollouts::new(setup, rules))
        }
        Err(e) => return Err(io(&path)(e)),
    };
    let r: Rollouts = serde_json::from_slice(&bytes).map_err(|e| StoreError::State {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    Ok(r.restored(setup, rules))
}

pub fn save(state_dir: &Path, r: &Rollouts) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec_pretty(r).map_err(|e| StoreError::State {
        path: state_dir.join(STATE_FILE),
        reason: e.to_string(),
    })?;
    tierd_runtime::state::write_atomic(state_dir, STATE_FILE, &bytes)
        .map_err(io(&state_dir.join(STATE_FILE)))
}

/// Where rollout `id`'s files live.
pub fn rollout_dir(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join(DIR).join(id)
}

/// Checks a candidate and keeps its files under `rollout_dir(state_dir, id)`: the manifest
/// parses and names a plain file, the ONNX bytes have the sha256 it pins, tract loads them and
/// the golden vectors pass. Returns the [`Release`] devices get.
pub fn add_candidate(
    state_dir: &Path,
    id: &str,
    manifest: &str,
    signature: &str,
    onnx: &[u8],
) -> Result<Release, StoreError> {
    let bad = |m: String| StoreError::Candidate(m);
    if manifest.len() > MAX_MANIFEST_BYTES {
        return Err(bad(format!(
            "the manifest is {} bytes, at most {MAX_MANIFEST_BYTES}",
            manifest.len()
        )));
    }
    if onnx.is_empty() || onnx.len() as u64 > MAX_MODEL_BYTES {
        return Err(bad(format!(
            "the ONNX file is {} bytes; it must be 1 to {MAX_MODEL_BYTES}",
            onnx.len()
        )));
    }
    if signature.trim().is_empty() {
        return Err(bad(
            "no manifest signature: sign it with `edge-agent model sign` (agents load only \
             signed models over the air)"
                .into(),
        ));
    }
    let dir = rollout_dir(state_dir, id);
    let probe = Path::new("candidate.toml");
    let m = tierd_runtime::Manifest::from_text(probe, manifest).map_err(|e| bad(e.to_string()))?;
    let file = plain_file_name(&m.file).ok_or_else(|| {
        bad(format!(
            "the manifest's file {} must be a plain file name (it is stored beside the manifest)",
            m.file.display()
        ))
    })?;
    let sha = hex::encode(Sha256::digest(onnx));
    if !sha.eq_ignore_ascii_case(&m.sha256) {
        return Err(bad(format!(
            "the ONNX file's sha256 is {sha} but the manifest pins {}",
            m.sha256
        )));
    }
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    tierd_runtime::state::write_atomic(&dir, &file, onnx).map_err(io(&dir.join(&file)))?;
    let manifest_name = format!("{}.toml", m.name);
    tierd_runtime::state::write_atomic(&dir, &manifest_name, manifest.as_bytes())
        .map_err(io(&dir.join(&manifest_name)))?;
    tierd_runtime::state::write_atomic(&dir, &format!("{manifest_name}.sig"), signature.as_bytes())
        .map_err(io(&dir))?;
    // Loaded exactly as an agent will: sha256, tract, golden vectors.
    let model =
        tierd_runtime::Model::load(&dir.join(&manifest_name)).map_err(|e| bad(e.to_string()))?;
    Ok(Release {
        model: model.id(),
        manifest: manifest.to_string(),
        signature: signature.to_string(),
        onnx_bytes: onnx.len() as u64,
        onnx_sha256: sha,
    })
}

/// `name` if it is a plain file name (no directory part), else `None`.
pub fn plain_file_name(name: &Path) -> Option<String> {
    let only = name.file_name()?.to_str()?;
    (Path::new(only) == name && !only.starts_with('.')).then(|| only.to_string())
}

/// `len` bytes (at most [`MAX_CHUNK_BYTES`]) of rollout `id`'s model file from `offset`, and
/// the file's size.
pub fn read_chunk(
    state_dir: &Path,
    id: &str,
    release: &Release,
    offset: u64,
    len: u32,
) -> Result<(Vec<u8>, u64), String> {
    let m = tierd_runtime::Manifest::from_text(Path::new("candidate.toml"), &release.manifest)
        .map_err(|e| e.to_string())?;
    let file = plain_file_name(&m.file).ok_or("the manifest names no plain file")?;
    let path = rollout_dir(state_dir, id).join(file);
    let mut f = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let total = f.metadata().map_err(|e| e.to_string())?.len();
    if offset >= total {
        return Err(format!("offset {offset} is past the end ({total} bytes)"));
    }
    let want = u64::from(len.min(MAX_CHUNK_BYTES)).min(total - offset);
    f.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; want as usize];
    f.read_exact(&mut buf).map_err(|e| e.to_string())?;
    Ok((buf, total))
}
