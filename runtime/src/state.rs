//! The daemons' state directory: where it is, and how a file in it is replaced safely.

use std::io::Write;
use std::path::{Path, PathBuf};

/// `configured` if set; else `$STATE_DIRECTORY` (set by systemd's `StateDirectory=`; it may
/// list several, colon-separated, and ours is the first); else `fallback` in the working
/// directory.
pub fn state_directory(configured: Option<&Path>, fallback: &str) -> PathBuf {
    configured.map(Path::to_path_buf).unwrap_or_else(|| {
        std::env::var_os("STATE_DIRECTORY")
            .filter(|v| !v.is_empty())
            .and_then(|v| {
                v.to_str()
                    .and_then(|s| s.split(':').next())
                    .map(PathBuf::from)
            })
            .unwrap_or_else(|| PathBuf::from(fallback))
    })
}

/// Writes `bytes` to `dir/name` so that a crash at any point leaves the old file or the new
/// one, never a mix: temp file, fsync, rename, fsync of the directory.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_wins_and_files_are_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(state_directory(Some(dir.path()), "x"), dir.path());
        write_atomic(dir.path(), "a.json", b"one").unwrap();
        write_atomic(dir.path(), "a.json", b"two").unwrap();
        assert_eq!(std::fs::read(dir.path().join("a.json")).unwrap(), b"two");
        assert!(!dir.path().join(".a.json.tmp").exists());
    }
}
