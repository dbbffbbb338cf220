//! The models a rollout brings, on disk, beside the one `agent.toml` names:
//!
//! ```text
//! <state_dir>/models/<name>@<version>/<name>.toml       the manifest, as signed
//! <state_dir>/models/<name>@<version>/<name>.toml.sig   its model-release signature
//! <state_dir>/models/<name>@<version>/<file>.part       the ONNX file while it downloads
//! <state_dir>/models/<name>@<version>/<file>            the ONNX file, once its size and sha256 match
//! <state_dir>/models/active.json                        the manifest serving, and the one before it
//! <state_dir>/rollout-state.json                        the last rollout document handled
//! <state_dir>/rollout-document.json                     that document, as signed
//! ```
//!
//! `active.json` is written (atomically) **before** a switch, so a restart at any point comes
//! back on a model that was verified: the one it names, verified again at start, or, if that
//! fails, the one `agent.toml` names.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tierd_protocol::rollout::Release;
use tierd_runtime::state::write_atomic;

pub const MODELS_DIR: &str = "models";
pub const ACTIVE_FILE: &str = "active.json";
pub const STATE_FILE: &str = "rollout-state.json";
/// The last rollout document taken, as signed: a restart takes it again from here (a broker may
/// not hand a retained message to a session it kept).
pub const DOCUMENT_FILE: &str = "rollout-document.json";

/// Which manifest serves, and the one it replaced (for a rollback).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Active {
    pub manifest: PathBuf,
    pub previous: PathBuf,
    pub rollout_id: String,
}

/// The last rollout document handled, and whether its step completed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Handled {
    pub rollout_id: String,
    pub version: u64,
    pub stage: String,
    pub done: bool,
}

/// Where one candidate's files go.
#[derive(Debug, Clone, PartialEq)]
pub struct Paths {
    pub dir: PathBuf,
    pub manifest: PathBuf,
    pub onnx: PathBuf,
    pub part: PathBuf,
}

/// The version part of a model id, if it is safe as a directory name.
fn safe_version(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 64
        && !v.starts_with('.')
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'+'))
}

/// Lays out `release`'s directory and writes its manifest and signature (the exact signed
/// text). The manifest must name a plain file.
pub fn prepare(state_dir: &Path, release: &Release) -> Result<Paths, String> {
    let (name, version) = release
        .model
        .split_once('@')
        .ok_or_else(|| format!("candidate {:?} is not name@version", release.model))?;
    tierd_protocol::topic::validate_model_name(name).map_err(|e| e.to_string())?;
    if !safe_version(version) {
        return Err(format!("candidate version {version:?} is not a plain name"));
    }
    let dir = state_dir.join(MODELS_DIR).join(&release.model);
    let manifest_path = dir.join(format!("{name}.toml"));
    let m = tierd_runtime::Manifest::from_text(&manifest_path, &release.manifest)
        .map_err(|e| format!("candidate manifest: {e}"))?;
    if m.id() != release.model {
        return Err(format!(
            "the manifest is {}, the rollout says {}",
            m.id(),
            release.model
        ));
    }
    if !m.sha256.eq_ignore_ascii_case(&release.onnx_sha256) {
        return Err(format!(
            "the manifest pins {} but the rollout ships {}",
            m.sha256, release.onnx_sha256
        ));
    }
    let file = m
        .file
        .file_name()
        .and_then(|f| f.to_str())
        .filter(|f| Path::new(f) == m.file && !f.starts_with('.'))
        .ok_or_else(|| {
            format!(
                "the manifest's file {} is not a plain file name",
                m.file.display()
            )
        })?
        .to_string();
    let io = |e: std::io::Error| format!("{}: {e}", dir.display());
    std::fs::create_dir_all(&dir).map_err(io)?;
    write_atomic(&dir, &format!("{name}.toml"), release.manifest.as_bytes()).map_err(io)?;
    write_atomic(
        &dir,
        &format!("{name}.toml.sig"),
        release.signature.as_bytes(),
    )
    .map_err(io)?;
    Ok(Paths {
        onnx: dir.join(&file),
        part: dir.join(format!("{file}.part")),
        manifest: manifest_path,
        dir,
    })
}

/// Bytes of the file already on disk: all of it once complete, else the partial download.
pub fn have(p: &Paths, total: u64) -> u64 {
    if std::fs::metadata(&p.onnx).is_ok_and(|m| m.len() == total) {
        return total;
    }
    std::fs::metadata(&p.part).map_or(0, |m| m.len().min(total))
}

/// Cuts the partial file back to `len` bytes (a whole number of chunks: a short write, from a
/// full disk or a power cut, is fetched again).
pub fn truncate_part(p: &Paths, len: u64) -> Result<(), String> {
    match std::fs::OpenOptions::new().write(true).open(&p.part) {
        Ok(f) => f
            .set_len(len)
            .map_err(|e| format!("{}: {e}", p.part.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{}: {e}", p.part.display())),
    }
}

/// Appends `data` at `offset` to the partial file, which must be exactly `offset` long.
pub fn append(p: &Paths, offset: u64, data: &[u8]) -> Result<(), String> {
    let io = |e: std::io::Error| format!("{}: {e}", p.part.display());
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p.part)
        .map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    if len != offset {
        return Err(format!(
            "{} is {len} bytes, the chunk is for offset {offset}",
            p.part.display()
        ));
    }
    f.write_all(data).map_err(io)
}

/// Checks the partial file's size and sha256, then makes it the model file (rename, with the
/// directory synced). A mismatch deletes it: the download starts over.
pub fn finish(p: &Paths, total: u64, sha256: &str) -> Result<(), String> {
    if std::fs::metadata(&p.onnx).is_ok_and(|m| m.len() == total) {
        // Kept from before (a restart, an earlier rollout of this version): checked again.
        let bytes = std::fs::read(&p.onnx).map_err(|e| format!("{}: {e}", p.onnx.display()))?;
        if hex::encode(Sha256::digest(&bytes)).eq_ignore_ascii_case(sha256) {
            return Ok(());
        }
        let _ = std::fs::remove_file(&p.onnx);
        return Err(format!(
            "{} on disk does not have the sha256 the manifest pins; discarded, fetched again next time",
            p.onnx.display()
        ));
    }
    let bytes = std::fs::read(&p.part).map_err(|e| format!("{}: {e}", p.part.display()))?;
    if bytes.len() as u64 != total {
        let _ = std::fs::remove_file(&p.part);
        return Err(format!(
            "downloaded {} bytes, the rollout says {total}",
            bytes.len()
        ));
    }
    let actual = hex::encode(Sha256::digest(&bytes));
    if !actual.eq_ignore_ascii_case(sha256) {
        let _ = std::fs::remove_file(&p.part);
        return Err(format!(
            "the downloaded file's sha256 is {actual}, the manifest pins {sha256}; discarded"
        ));
    }
    if let Ok(f) = std::fs::File::open(&p.part) {
        let _ = f.sync_all();
    }
    std::fs::rename(&p.part, &p.onnx).map_err(|e| format!("{}: {e}", p.onnx.display()))?;
    if let Ok(d) = std::fs::File::open(&p.dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, String> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

pub fn load_active(state_dir: &Path) -> Result<Option<Active>, String> {
    read_json(&state_dir.join(MODELS_DIR).join(ACTIVE_FILE))
}

pub fn save_active(state_dir: &Path, a: &Active) -> Result<(), String> {
    let dir = state_dir.join(MODELS_DIR);
    let bytes = serde_json::to_vec_pretty(a).map_err(|e| e.to_string())?;
    write_atomic(&dir, ACTIVE_FILE, &bytes).map_err(|e| format!("{}: {e}", dir.display()))
}

pub fn clear_active(state_dir: &Path) -> Result<(), String> {
    let path = state_dir.join(MODELS_DIR).join(ACTIVE_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

pub fn save_document(state_dir: &Path, payload: &[u8]) -> Result<(), String> {
    write_atomic(state_dir, DOCUMENT_FILE, payload)
        .map_err(|e| format!("{}: {e}", state_dir.display()))
}

pub fn load_document(state_dir: &Path) -> Option<Vec<u8>> {
    std::fs::read(state_dir.join(DOCUMENT_FILE)).ok()
}

pub fn load_handled(state_dir: &Path) -> Handled {
    read_json(&state_dir.join(STATE_FILE))
        .ok()
        .flatten()
        .unwrap_or_default()
}

pub fn save_handled(state_dir: &Path, h: &Handled) -> Result<(), String> {
    let bytes = serde_json::to_vec_pretty(h).map_err(|e| e.to_string())?;
    write_atomic(state_dir, STATE_FILE, &bytes).map_err(|e| format!("{}: {e}", state_dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(manifest: &str, sha: &str) -> Release {
        Release {
            model: "m@2.0.0".into(),
            manifest: manifest.into(),
            signature: "{}".into(),
            onnx_bytes: 6,
            onnx_sha256: sha.into(),
        }
    }

    #[test]
    fn a_download_resumes_and_is_checked_before_it_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = b"abcdef";
        let sha = hex::encode(Sha256::digest(data));
        // A manifest that does not parse is refused before anything is written.
        let e = prepare(dir.path(), &release("nonsense", &sha)).unwrap_err();
        assert!(e.contains("candidate manifest"), "{e}");
        let paths = Paths {
            dir: dir.path().to_path_buf(),
            manifest: dir.path().join("m.toml"),
            onnx: dir.path().join("m.onnx"),
            part: dir.path().join("m.onnx.part"),
        };
        assert_eq!(have(&paths, 6), 0);
        append(&paths, 0, b"abc").expect("append");
        assert_eq!(have(&paths, 6), 3, "resumes after what is on disk");
        let e = append(&paths, 1, b"x").unwrap_err();
        assert!(e.contains("offset 1"), "{e}");
        append(&paths, 3, b"def").expect("append");
        finish(&paths, 6, &sha).expect("finish");
        finish(&paths, 6, &sha).expect("kept, checked again");
        // A kept file of the right size but other bytes is discarded, not trusted by its size.
        std::fs::write(&paths.onnx, b"abcdeZ").expect("write");
        let e = finish(&paths, 6, &sha).unwrap_err();
        assert!(e.contains("sha256") && !paths.onnx.exists(), "{e}");
        std::fs::write(&paths.onnx, data).expect("write");
        // A short write leaves a partial chunk: cut back to whole chunks.
        std::fs::write(&paths.part, b"abcd").expect("write");
        truncate_part(&paths, 2).expect("truncate");
        assert_eq!(
            std::fs::metadata(&paths.part).map(|m| m.len()).ok(),
            Some(2)
        );
        std::fs::remove_file(&paths.part).expect("rm");
        assert_eq!(have(&paths, 6), 6);
        assert!(!paths.part.exists());
        // A corrupt download is discarded with the reason.
        append(
            &Paths {
                onnx: dir.path().join("n.onnx"),
                part: dir.path().join("n.part"),
                ..paths.clone()
            },
            0,
            b"abcdeX",
        )
        .expect("append");
        let bad = Paths {
            onnx: dir.path().join("n.onnx"),
            part: dir.path().join("n.part"),
            ..paths
        };
        let e = finish(&bad, 6, &sha).unwrap_err();
        assert!(e.contains("sha256"), "{e}");
        assert!(!bad.part.exists() && !bad.onnx.exists());
    }

    #[test]
    fn a_full_disk_is_refused_with_the_reason() {
        // /dev/full takes any open and fails every write with ENOSPC, as a full SD card does.
        let full = Path::new("/dev/full");
        if !full.exists() {
            return;
        }
        let paths = Paths {
            dir: PathBuf::from("/dev"),
            manifest: PathBuf::from("/dev/null"),
            onnx: PathBuf::from("/nonexistent/m.onnx"),
            part: full.to_path_buf(),
        };
        let e = append(&paths, 0, b"abc").unwrap_err();
        assert!(e.contains("No space left on device"), "{e}");
    }

    #[test]
    fn active_and_handled_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(load_active(dir.path()), Ok(None));
        let a = Active {
            manifest: "a.toml".into(),
            previous: "b.toml".into(),
            rollout_id: "r".into(),
        };
        save_active(dir.path(), &a).expect("save");
        assert_eq!(load_active(dir.path()), Ok(Some(a)));
        clear_active(dir.path()).expect("clear");
        assert_eq!(load_active(dir.path()), Ok(None));
        assert_eq!(load_handled(dir.path()), Handled::default());
        let h = Handled {
            rollout_id: "r".into(),
            version: 9,
            stage: "shadow".into(),
            done: true,
        };
        save_handled(dir.path(), &h).expect("save");
        assert_eq!(load_handled(dir.path()), h);
    }
}
