//! Ed25519 signing-key files: a key pair in PKCS#8 v2, created with `create_new` and mode
//! 0600 so an existing key is never overwritten; loading refuses a file any group or other
//! user may read or write, and bytes that are not an Ed25519 PKCS#8 key. The relay's
//! config-signing key (`cloud-relay keygen`) and model-release keys (`edge-agent model
//! keygen`) are such files.

use std::io::Write;
use std::path::{Path, PathBuf};

use thiserror::Error;
use tierd_protocol::signed::KeyError;
use tierd_protocol::Signer;

/// Why the signing key could not be loaded or created.
#[derive(Debug, Error)]
pub enum KeyFileError {
    #[error("cannot read the signing key {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create the signing key {}: {source}", .path.display())]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the signing key {} is readable or writable by others (mode {mode:03o}); run `chmod 600 {}`",
        .path.display(), .path.display()
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("the signing key {}: {source}", .path.display())]
    Key { path: PathBuf, source: KeyError },
}

/// Loads an existing key file, refusing group/other permission bits.
pub fn load(path: &Path) -> Result<Signer, KeyFileError> {
    let read = |source| KeyFileError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read)?;
    check_mode(path, &meta)?;
    let bytes = std::fs::read(path).map_err(read)?;
    Signer::from_pkcs8(&bytes).map_err(|source| KeyFileError::Key {
        path: path.to_owned(),
        source,
    })
}

#[cfg(unix)]
fn check_mode(path: &Path, meta: &std::fs::Metadata) -> Result<(), KeyFileError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_mode(_path: &Path, _meta: &std::fs::Metadata) -> Result<(), KeyFileError> {
    Ok(())
}

/// Creates a new key file (never overwrites one: `create_new`), mode 0600, fsynced.
pub fn create(path: &Path) -> Result<Signer, KeyFileError> {
    let fail = |source| KeyFileError::Create {
        path: path.to_owned(),
        source,
    };
    let pkcs8 = Signer::generate_pkcs8().map_err(|source| KeyFileError::Key {
        path: path.to_owned(),
        source,
    })?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(fail)?;
    file.write_all(&pkcs8).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    Signer::from_pkcs8(&pkcs8).map_err(|source| KeyFileError::Key {
        path: path.to_owned(),
        source,
    })
}

/// Loads the key, creating it first when the file does not exist. `true` when it was created.
pub fn load_or_create(path: &Path) -> Result<(Signer, bool), KeyFileError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match create(path) {
            Ok(s) => Ok((s, true)),
            // Another replica (or process) created it in between: take that one.
            Err(KeyFileError::Create { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                Ok((load(path)?, false))
            }
            Err(e) => Err(e),
        },
        _ => Ok((load(path)?, false)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_then_loads_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("key.pk8");
        let (a, created) = load_or_create(&path).unwrap();
        assert!(created);
        let (b, created) = load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(a.public(), b.public());
        assert!(matches!(create(&path), Err(KeyFileError::Create { .. })));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[cfg(unix)]
    #[test]
    fn refuses_loose_permissions_and_bad_bytes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pk8");
        create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::write(&path, b"not a key").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("PKCS#8"), "{e}");
    }
}
