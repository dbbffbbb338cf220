//! The relay's config-signing key: an Ed25519 key file (`tierd_runtime::keyfile`: PKCS#8 v2,
//! mode 0600, never overwritten), `config-signing-key.pk8` in the state directory or at
//! `signing_key` in `relay.toml`. Replicas that push config must share the same file, and
//! agents pin its public key (`cloud-relay keygen --print-public`).

use std::path::{Path, PathBuf};

pub use tierd_runtime::keyfile::{create, load, load_or_create, KeyFileError as SigningKeyError};

/// The key file's name in the state directory.
pub const KEY_FILE: &str = "config-signing-key.pk8";

/// Where the key lives: `configured` (relay.toml `signing_key`), else the state directory's
/// [`KEY_FILE`].
pub fn key_path(configured: Option<&Path>, state_dir: &Path) -> PathBuf {
    configured.map_or_else(|| state_dir.join(KEY_FILE), Path::to_path_buf)
}
